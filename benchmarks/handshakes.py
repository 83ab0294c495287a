"""python -m benchmarks.handshakes [--quick] [--write]

The cost a service pays on every connection (issue 14, item 3): mutual-TLS
requests per second on fresh connections -- a full handshake each, no
session resumption, no keep-alive -- against a local nginx that demands a
client certificate (``ssl_verify_client on``, session cache and tickets
off), with the client key in the token and with the same key as a PEM file.

Clients: Python's ``ssl`` (http.client, a new connection per request; the
context made once), pycurl (FRESH_CONNECT, FORBID_REUSE, no session-id
cache) and the curl command line (one process per request).  Routes: the
PEM file (the baseline), a token identity and an ephemeral one through
``Identity.ssl_context()`` (OpenSSL 3's pkcs11 provider) and
``setup_pycurl`` (OpenSSL's pkcs11 engine); the curl CLI through
``client_env`` (provider) and ``curl_args`` (engine).  EC P-256 and
RSA-2048, one client key per type, every route using that same key.

Each route runs in a worker process of its own (the provider is configured
once per process; session objects are seen only by the process that made
them); the parent asks the workers in turn, one batch each, rotating the
order every round, so every ratio is of batches measured side by side.
PKCS#11 calls per handshake are counted by tests/p11shim in separate
workers (so the timed ones do not pay for counting).

The full run writes benchmarks/HANDSHAKES.md; --quick (< 1 minute) prints
the same page from fewer, smaller batches and writes it only with --write.
"""

from __future__ import annotations

import argparse
import faulthandler
import http.client
import io
import json
import os
import secrets
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUTPUT = HERE / "HANDSHAKES.md"
COMMAND = ".venv/bin/python -m benchmarks.handshakes"

KEY_TYPES = {"ec": "EC P-256", "rsa": "RSA-2048"}
CURL_TIMEOUT = 15  # s
ANSWER_TIMEOUT = 60  # s: a stuck worker is an error, not a hang
TARGET = 0.8  # issue 14: token key >= 0.8x the PEM file's throughput, in process
IN_PROCESS = ("python", "python-newctx", "pycurl", "pycurl-engcert")
SHIPPED = ("python", "pycurl")  # the in-process routes as keychain_ext sets them up
CLIENT_NAMES = {
    "python": "Python ssl (http.client)",
    "pycurl": "pycurl",
    "pycurl-engcert": "pycurl",
    "python-newctx": "Python ssl (http.client)",
    "curl": "curl CLI, a process per request",
}
# what each worker holds: how its routes reach the key
MODES = {
    "pem": "PEM file",
    "token": "token identity",
    "ephemeral": "ephemeral identity",
    "token_cache_keys": "token identity, provider with pkcs11-module-cache-keys = true",
    "token_populated": "token identity, other identities on the token",
    "token_no_opstate": "token identity, provider with the no-operation-state quirk",
}
ENGCERT = "setup_pycurl, then the certificate by URI (engine): the glue before this benchmark"
# (client, mode, route): every row measured
ROWS: tuple[tuple[str, str, str], ...] = (
    ("python", "pem", "load_cert_chain(cert.pem, key.pem)"),
    ("python", "token", "Identity.ssl_context() (provider)"),
    ("python", "ephemeral", "Identity.ssl_context() (provider)"),
    ("python", "token_cache_keys", "Identity.ssl_context() (provider)"),
    ("python", "token_no_opstate", "Identity.ssl_context() (provider)"),
    ("python-newctx", "pem", "a new context per request: load_cert_chain(PEM files)"),
    ("python-newctx", "token", "a new context per request: Identity.ssl_context()"),
    ("pycurl", "pem", "SSLCERT/SSLKEY PEM files"),
    ("pycurl", "token", "setup_pycurl (engine)"),
    ("pycurl", "ephemeral", "setup_pycurl (engine)"),
    ("python", "token_populated", "Identity.ssl_context() (provider)"),
    ("pycurl", "token_populated", "setup_pycurl (engine)"),
    ("pycurl-engcert", "token", ENGCERT),
    ("pycurl-engcert", "token_populated", ENGCERT),
    ("curl", "pem", "--cert cert.pem --key key.pem"),
    ("curl", "token", "client_env: --cert/--key from the provider's files"),
    ("curl-engine", "token", "client_env + curl_args (engine)"),
)
# provider settings a worker mode changes from keychain_ext's (benchmark only)
MODE_OPTIONS = {
    "token_cache_keys": {"pkcs11-module-cache-keys": "true"},
    "token_no_opstate": {"pkcs11-module-quirks": "no-deinit no-operation-state"},
}


@dataclass(frozen=True)
class Settings:
    rounds: int = 20
    batch: int = 40  # in-process requests per batch
    cli_batch: int = 8  # curl processes per batch
    # other identities on the token of the "token_populated" worker (in a
    # SoftHSM2 store of its own: the curl processes of other rows never load it)
    fillers: int = 100

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=4, batch=12, cli_batch=3)


def row_id(client: str, mode: str) -> str:
    return f"{client}/{mode}"


# ------------------------------------------------------------------ worker


def _stuck(pid: int) -> str:
    """Where a process waits (its threads' kernel wait channels)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return ", ".join(Path(f"/proc/{pid}/task/{t}/wchan").read_text() for t in tasks)
    except OSError as exc:
        return str(exc)


class _Routes:
    """The requests one worker makes: a mode's identity (or PEM files) and
    the clients that use it.  Every answer is checked against the DN the
    server must have seen."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.url, self.ca = spec["url"], spec["ca"]
        self.expected = json.dumps({"client": f"CN={spec['cn']}"}).encode() + b"\n"
        host, port = self.url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.keychain: Any = None
        self.env = dict(os.environ)
        self.cli_args = ["--cert", spec["cert"], "--key", spec["key"]]
        self.engine_args: list[str] = []
        mode = spec["mode"]
        if mode != "pem":
            self._open_identity(mode)
        self.context = self._new_context()
        self.handle = self._pycurl()
        self.engcert = None
        if mode != "pem":  # the certificate found by the engine per connection
            import pycurl

            self.engcert = self._pycurl()
            self.engcert.setopt(pycurl.SSLCERTTYPE, "ENG")
            self.engcert.setopt(pycurl.SSLCERT, self.ident.cert_uri)

    def _open_identity(self, mode: str) -> None:
        from keychain_ext import Keychain, _provider
        from keychain_ext.curl import client_env, curl_args, setup_pycurl

        options = MODE_OPTIONS.get(mode, {})
        known = {name for name, _, _ in _provider.OPTIONS}
        _provider.OPTIONS = tuple(
            (name, options.get(name, value), why) for name, value, why in _provider.OPTIONS
        ) + tuple((n, v, "benchmark variant") for n, v in options.items() if n not in known)
        spec = self.spec
        if "own_store" in spec:  # a SoftHSM2 store of its own, not loaded by the curl rows
            from .runner import new_token, prepare_environment

            prepare_environment(Path(spec["own_store"]))
            _, spec["token"], spec["pin"] = new_token(f"{mode}-own")
        self.keychain = Keychain(spec["module"], spec["token"], spec["pin"])
        ephemeral = mode == "ephemeral"
        self.ident = self.keychain.preauth_key(
            spec["p12"], spec["password"], spec["label"], ephemeral=ephemeral
        )
        for i, p12 in enumerate(spec.get("fillers", ())):
            self.keychain.preauth_key(p12, spec["password"], f"filler-{i}")
        self.setup_pycurl = setup_pycurl
        if not ephemeral:
            self.env = client_env(self.ident)
            self.cli_args = ["--cert", self.env["KEYCHAIN_EXT_CERT"]]
            self.cli_args += ["--key", self.env["KEYCHAIN_EXT_KEY"]]
            self.engine_args = curl_args(self.ident)

    def _new_context(self) -> ssl.SSLContext:
        if self.keychain is not None:
            return self.ident.ssl_context(cafile=self.ca)  # type: ignore[no-any-return]
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(self.spec["cert"], self.spec["key"])
        return context

    def _pycurl(self) -> Any:
        import pycurl

        handle = pycurl.Curl()
        if self.keychain is not None:
            # the engine rows; pycurl's default, the provider, loads the key per
            # connection as the curl rows' --key does
            self.setup_pycurl(handle, self.ident, route="engine")
        else:
            handle.setopt(pycurl.SSLCERT, self.spec["cert"])
            handle.setopt(pycurl.SSLKEY, self.spec["key"])
        handle.setopt(pycurl.URL, self.url)
        handle.setopt(pycurl.CAINFO, self.ca)
        handle.setopt(pycurl.FRESH_CONNECT, 1)
        handle.setopt(pycurl.FORBID_REUSE, 1)
        handle.setopt(pycurl.SSL_SESSIONID_CACHE, 0)
        handle.setopt(pycurl.TIMEOUT, 30)
        return handle

    def _check(self, client: str, body: bytes) -> None:
        if body != self.expected:
            raise RuntimeError(f"{client}: the server answered {body!r}")

    def request(self, client: str) -> None:
        if client.startswith("python"):
            context = self.context if client == "python" else self._new_context()
            conn = http.client.HTTPSConnection(self.host, self.port, context=context)
            try:
                conn.request("GET", "/")
                body = conn.getresponse().read()
            finally:
                conn.close()
        elif client.startswith("pycurl"):
            import pycurl

            handle = self.engcert if client == "pycurl-engcert" else self.handle
            buf = io.BytesIO()
            handle.setopt(pycurl.WRITEDATA, buf)
            handle.perform()
            body = buf.getvalue()
        else:
            args = self.engine_args if client == "curl-engine" else self.cli_args
            argv = ["curl", "-sS", "--fail", "--no-sessionid", "--cacert", self.ca, *args]
            proc = subprocess.Popen(
                [*argv, self.url],
                env=self.env,
                stdin=subprocess.DEVNULL,  # never a prompt, nor the commands of this worker
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                body, err = proc.communicate(timeout=CURL_TIMEOUT)
            except subprocess.TimeoutExpired:
                stuck = _stuck(proc.pid)
                proc.kill()
                body, err = proc.communicate()
                raise RuntimeError(f"{client}: curl hung ({stuck}); it wrote {body!r}") from None
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{client}: exit {proc.returncode}: {err.decode(errors='replace')}"
                )
        self._check(client, body)

    def batch(self, client: str, n: int) -> float:
        """Requests per second over n fresh connections."""
        start = time.perf_counter()
        for _ in range(n):
            self.request(client)
        return n / (time.perf_counter() - start)

    def count(self, client: str) -> dict[str, int]:
        """PKCS#11 calls of one request (the module is tests/p11shim)."""
        from .runner import load_shim_tools

        shim = load_shim_tools().Shim(self.spec["module"])
        self.request(client)  # warm: the first use may list slots, log in
        shim.reset()
        self.request(client)
        return shim.counts()

    def close(self) -> None:
        self.handle.close()
        if self.keychain is not None:
            self.keychain.kill_key(self.spec["label"])
            for i in range(len(self.spec.get("fillers", ()))):
                self.keychain.kill_key(f"filler-{i}")
            self.keychain.close()


def worker() -> None:
    """Serve the parent: the spec on the first stdin line, then one JSON
    command a line ({"client", "n"} or {"count": client}), one JSON answer
    a line on stdout."""
    spec = json.loads(sys.stdin.readline())
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the parent's pipe
    routes = _Routes(spec)
    try:
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        for line in sys.stdin:
            cmd = json.loads(line)
            faulthandler.dump_traceback_later(ANSWER_TIMEOUT - 10)  # where a stuck one is
            if "count" in cmd:
                answer: Any = routes.count(cmd["count"])
            else:
                answer = routes.batch(cmd["client"], cmd["n"])
            faulthandler.cancel_dump_traceback_later()
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        routes.close()


class Worker:
    """A worker process, driven through its stdin and stdout."""

    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.handshakes", "--worker"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.name, self.doing = spec["mode"], "start"
        self._send(spec)
        self._answer()

    def _send(self, obj: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT)
        if not ready:
            raise TimeoutError(
                f"worker {self.name} ({self.doing}) did not answer in {ANSWER_TIMEOUT} s"
            )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} ended (exit {self.proc.wait()})")
        return json.loads(line)

    def rate(self, client: str, n: int) -> float:
        self.doing = client
        self._send({"client": client, "n": n})
        return float(self._answer())

    def count(self, client: str) -> dict[str, int]:
        self.doing = f"count {client}"
        self._send({"count": client})
        return dict(self._answer())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if code != 0:
            raise RuntimeError(f"worker {self.name} exited with {code}")


# ------------------------------------------------------------------ parent


def _stats(xs: list) -> dict:
    from .runner import spread

    return spread(xs)  # type: ignore[no-any-return]


def measure(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Every row of ROWS for both key types, and the calls per handshake."""
    from tests.pki import make_client, make_pki
    from tests.servers import NginxServer

    from .runner import load_shim_tools, new_token, prepare_environment

    started = time.monotonic()
    load_before = os.getloadavg()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    root = Path(tempfile.mkdtemp(prefix="keychain_ext-handshakes-", dir=base))
    workers: dict[tuple[str, str], Worker] = {}
    try:
        prepare_environment(root)
        shim = load_shim_tools().build_shim(root / "shim")
        tokens = {  # a token per worker: made before any worker starts
            (mode, kt): new_token(f"{mode}-{kt}")
            for mode in MODES
            if mode not in ("pem", "token_populated")
            for kt in KEY_TYPES
        }
        os.environ["P11SHIM_TARGET"] = next(iter(tokens.values()))[0]
        pki = make_pki(root / "pki")
        password = secrets.token_hex(8)
        clients = {
            kt: make_client(pki, cn=f"handshakes-{kt}", password=password, key_type=kt)
            for kt in KEY_TYPES
        }
        fillers = {
            kt: [
                make_client(pki, cn=f"f{i}", password=password, key_type="ec", name=f"f{kt}{i}")
                for i in range(settings.fillers)
            ]
            for kt in KEY_TYPES
        }

        def spec(mode: str, kt: str, url: str, module: Optional[str] = None) -> dict:
            c = clients[kt]
            s = {"mode": mode, "url": url, "ca": str(pki.ca_cert), "cn": c.cn}
            s.update(cert=str(c.cert), key=str(c.key), p12=str(c.p12), password=password)
            if mode == "token_populated":  # the worker makes its token, in its own store
                s.update(module=module or os.environ["P11SHIM_TARGET"], label=f"handshakes-{kt}")
                s["fillers"] = [str(f.p12) for f in fillers[kt]]
                s["own_store"] = str(root / f"store-{kt}-{secrets.token_hex(4)}")
            elif mode != "pem":
                real, label, pin = tokens[mode, kt]
                s.update(module=module or real, token=label, pin=pin, label=f"handshakes-{kt}")
            return s

        results: dict = {"settings": vars(settings), "rows": {}, "calls": {}}
        results["tokens"] = len(tokens)  # in the store the curl processes load
        with NginxServer(pki, fresh_handshakes=True) as nginx:
            for kt in KEY_TYPES:  # counting workers first, one at a time
                for mode in (m for m in MODES if m != "pem"):
                    w = Worker(spec(mode, kt, nginx.url, str(shim)))
                    try:
                        for client, m, _ in ROWS:
                            if m == mode and client in IN_PROCESS:
                                calls = w.count(client)
                                results["calls"].setdefault(kt, {})[row_id(client, m)] = calls
                    finally:
                        w.close()
            log(f"calls counted ({time.monotonic() - started:.0f} s)")
            for kt in KEY_TYPES:
                for mode in MODES:
                    log(f"start {kt} {mode}")
                    workers[kt, mode] = Worker(spec(mode, kt, nginx.url))
            order = [(kt, client, mode) for kt in KEY_TYPES for client, mode, _ in ROWS]
            rates: dict = {kt: {row_id(c, m): [] for c, m, _ in ROWS} for kt in KEY_TYPES}
            for r in range(settings.rounds):
                shift = r % len(order)
                for kt, client, mode in order[shift:] + order[:shift]:
                    n = settings.batch if client in IN_PROCESS else settings.cli_batch
                    rates[kt][row_id(client, mode)].append(workers[kt, mode].rate(client, n))
                log(f"round {r + 1}/{settings.rounds} ({time.monotonic() - started:.0f} s)")
            for w in workers.values():
                w.close()
            workers.clear()
        results["rates"] = rates
        for kt, rows in rates.items():
            results["rows"][kt] = {rid: _stats(xs) for rid, xs in rows.items()}
        results["load_before"] = load_before
        results["load_after"] = os.getloadavg()
        results["seconds"] = time.monotonic() - started
        return results
    finally:
        for w in workers.values():
            w.proc.kill()
            w.proc.wait()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ report


def ratios(results: dict) -> list[dict]:
    """Every non-PEM row against the PEM row of its client and key type:
    the ratio of medians and the spread of the per-round ratios (batches
    measured side by side); ``target`` met / not met for in-process token
    keys (the route keychain_ext ships, not the cache-keys variant)."""
    from .report import ImpossibleValue, positive, ratio

    out = []
    for kt in results["rows"]:
        rows, rates = results["rows"][kt], results["rates"][kt]
        for client, mode, _ in ROWS:
            if mode == "pem":
                continue
            base = {"curl-engine": "curl", "pycurl-engcert": "pycurl"}.get(client, client)
            rid, pid = row_id(client, mode), row_id(base, "pem")
            entry: dict = {"key_type": kt, "row": rid}
            try:
                entry["ratio"] = ratio(rows[rid]["median"], rows[pid]["median"], rid)
                per_round = [
                    positive(a, rid) / positive(b, pid) for a, b in zip(rates[rid], rates[pid])
                ]
            except (ImpossibleValue, KeyError, TypeError) as exc:
                entry["status"], entry["why"] = "rejected", str(exc)
                out.append(entry)
                continue
            entry["round_ratios"] = _stats(per_round)
            if client in SHIPPED and mode in ("token", "ephemeral", "token_populated"):
                entry["status"] = "met" if entry["ratio"] >= TARGET else "not met"
            out.append(entry)
    return out


def _rate(sp: Optional[dict]) -> str:
    if not sp:
        return "—"
    return f"{sp['median']:,.0f} [{sp['q1']:,.0f}–{sp['q3']:,.0f}]"


def _calls(calls: Optional[dict]) -> str:
    if not calls:
        return "—"
    parts = ", ".join(f"{k[2:]} {v}" for k, v in sorted(calls.items()))
    return f"{sum(calls.values())}: {parts}"


def _commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    paths = ("keychain_ext", "benchmarks", ":!benchmarks/HANDSHAKES.md")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    return head + (" (with uncommitted changes)" if dirty else "")


def markdown(results: dict, quick: bool) -> str:
    from .report import machine

    m = machine()
    load = "/".join(f"{x:.1f}" for x in results["load_before"])
    load_after = "/".join(f"{x:.1f}" for x in results["load_after"])
    s = results["settings"]
    by_row = {(r["key_type"], r["row"]): r for r in ratios(results)}
    lines = [
        "| client | key | route | "
        + " | ".join(
            f"{name} req/s [IQR] | × PEM (rounds min–max) | PKCS#11 calls / handshake"
            for name in KEY_TYPES.values()
        )
        + " |",
        "|---|---|---|" + "---|---|---|" * len(KEY_TYPES),
    ]
    for client, mode, route in ROWS:
        rid = row_id(client, mode)
        cells = []
        for kt in KEY_TYPES:
            sp = results["rows"][kt].get(rid)
            r = by_row.get((kt, rid))
            if r is None:
                rel = "1 (baseline)"
            elif "ratio" not in r:
                rel = f"rejected: {r['why']}"
            else:
                rr = r["round_ratios"]
                rel = f"{r['ratio']:.2f} ({rr['min']:.2f}–{rr['max']:.2f})"
            calls = results["calls"].get(kt, {}).get(rid)
            counted = "not counted" if client not in IN_PROCESS else "0"
            cells += [_rate(sp), rel, _calls(calls) if calls else counted]
        name = CLIENT_NAMES.get(client, CLIENT_NAMES["curl"])
        lines.append(f"| {name} | {MODES[mode]} | {route} | " + " | ".join(cells) + " |")
    targets = []
    for r in ratios(results):
        if "status" not in r:
            continue
        client, mode = r["row"].split("/")
        what = f"{CLIENT_NAMES[client]}, {MODES[mode]}, {KEY_TYPES[r['key_type']]}"
        figure = f"{r['ratio']:.2f}× the PEM file" if "ratio" in r else r["why"]
        targets.append(f"- **{r['status']}** — {what}: {figure}")
    return f"""# Mutual TLS on fresh connections: the key in the token vs a PEM file

Generated by `{COMMAND}{" --quick" if quick else ""}` — do not edit; run it again.
See the module's docstring (benchmarks/handshakes.py) for what is measured.

Commit {_commit()} · {m["date"]} · {m["cpu"]}, {m["cores"]} cores, {m["os"]} ·
{m["openssl"]}, SoftHSM2 {m["softhsm2"]}, Python {m["python"]}.
Load average (1/5/15 min) before {load}, after {load_after} (the run's own
workers and nginx count; above about 1 before it starts, something else
shares the cores and absolute rates suffer); the ratios compare batches run
side by side.
Run time {results["seconds"]:.0f} s: {s["rounds"]} rounds; a batch is {s["batch"]}
requests in process, {s["cli_batch"]} curl processes; "other identities":
{s["fillers"]} EC token identities beside the client's, on a token of their own.

Server: nginx, `ssl_verify_client on`, session cache and tickets off,
no keep-alive; every answer checked to carry the client's DN.  Requests
per second: median of the batches, interquartile range in brackets.
"× PEM": the route's median over the PEM file's, same client and key type;
in brackets the smallest and largest ratio of one round's two batches.
Calls: what tests/p11shim counted for one request after a first one.

{chr(10).join(lines)}

## Target (issue 14): in process, token key ≥ {TARGET}× the PEM file

{chr(10).join(targets)}

## Findings

{findings(results)}
"""


def findings(results: dict) -> str:
    """What the rows say, figures taken from them."""
    by_row = {(r["key_type"], r["row"]): r.get("ratio") for r in ratios(results)}
    calls = results["calls"]

    def fig(kt: str, rid: str) -> str:
        x = by_row.get((kt, rid))
        return f"{x:.2f}×" if x else "—"

    def vs(kt: str, a: str, b: str) -> str:
        rows = results["rows"][kt]
        try:
            return f"{rows[a]['median'] / rows[b]['median']:.2f}×"
        except (KeyError, TypeError, ZeroDivisionError):
            return "—"

    def total(kt: str, rid: str) -> str:
        c = calls.get(kt, {}).get(rid)
        return str(sum(c.values())) if c else "—"

    return f"""- **Provider route (Python ssl): nothing of ours left per handshake.**
  No search, no login, no session opened: the provider keeps the key's
  object handle, its login and its sessions (`pkcs11-module-cache-sessions`
  at its default already serves a sequential client; `load-behavior` and
  `login-behavior` act at start-up and on public-key loads, not per
  handshake).  {total("ec", "python/token")} calls per EC handshake
  (2 `C_GetSessionInfo`, the provider's login check, then `C_SignInit` +
  `C_Sign`), {total("rsa", "python/token")} per RSA one (digest-sign in
  parts, plus the `C_GetOperationState` OpenSSL's context duplication asks
  for).  What remains is, by elimination, the signature inside SoftHSM2
  (not timed alone): token key EC
  {fig("ec", "python/token")}, RSA {fig("rsa", "python/token")} of the PEM
  file; ephemeral EC {fig("ec", "python/ephemeral")}, RSA
  {fig("rsa", "python/ephemeral")}; with other identities on the token
  EC {fig("ec", "python/token_populated")}, RSA
  {fig("rsa", "python/token_populated")} (the calls do not grow).
- **A context per request** pays for loading the key through the provider
  every time: {total("ec", "python-newctx/token")} calls per request (EC),
  {total("rsa", "python-newctx/token")} (RSA) — searches and attribute reads
  for the key and its public half, the provider's login checks — and
  throughput EC {fig("ec", "python-newctx/token")}, RSA
  {fig("rsa", "python-newctx/token")} of a new PEM context per request.
  keychain_ext's part: `Identity.ssl_context()` now says to make the
  context once and reuse it (caching it inside would hand every caller the
  same mutable `SSLContext`).
- **`pkcs11-module-cache-keys`**: keychain_ext sets it false so that a
  context made before a kill stops working (tests/test_provider.py).  On
  SoftHSM2, true changes no call per handshake
  ({total("ec", "python/token_cache_keys")} / {total("rsa", "python/token_cache_keys")})
  and throughput within the noise: EC {fig("ec", "python/token_cache_keys")},
  RSA {fig("rsa", "python/token_cache_keys")} of the PEM file, against
  {fig("ec", "python/token")} / {fig("rsa", "python/token")} with false.
  Nothing to gain, a promise to lose: false stays.  The
  `no-operation-state` quirk saves RSA's `C_GetOperationState`
  ({total("rsa", "python/token_no_opstate")} calls) but no throughput (RSA
  {fig("rsa", "python/token_no_opstate")}, EC
  {fig("ec", "python/token_no_opstate")}) and forbids OpenSSL to duplicate
  a signing context: not adopted.
- **Engine route (pycurl): one search per handshake removed.**  libcurl
  loads certificate and key again for every connection, and libp11 searches
  the token for each, fetching the matches one `C_FindObjects` at a time;
  SoftHSM2 walks every object it can see for each.  `setup_pycurl` now
  hands libcurl the certificate in memory (`SSLCERT_BLOB`, read once through
  the provider): {total("ec", "pycurl/token")} calls per handshake instead of
  {total("ec", "pycurl-engcert/token")}; with other identities on the
  token {total("ec", "pycurl/token_populated")} instead of
  {total("ec", "pycurl-engcert/token_populated")}, throughput
  {vs("ec", "pycurl/token_populated", "pycurl-engcert/token_populated")} (EC),
  {vs("rsa", "pycurl/token_populated", "pycurl-engcert/token_populated")} (RSA)
  of the old glue's.  The key's search stays (libcurl asks the engine for
  the key on every connection; not ours to change in libcurl 7.88): token
  key EC {fig("ec", "pycurl/token")}, RSA {fig("rsa", "pycurl/token")} of the
  PEM file on a near-empty token (libcurl re-reads and parses the PEM
  files on every connection too: the engine can come out ahead), but EC
  {fig("ec", "pycurl/token_populated")}, RSA
  {fig("rsa", "pycurl/token_populated")} beside the other identities,
  where the provider route does not slow down: the target is not met
  there.  Keep tokens that serve pycurl small (ephemeral identities, or a
  token per service); the search is also what makes a killed identity fail
  at the next connection.
- **curl CLI: a process per request** is process start-up, and with the
  token key also loading the provider or the engine, initializing SoftHSM2
  (which reads every token in its directory: {results["tokens"]} small ones here), listing
  slots and logging in, every time: provider
  {fig("ec", "curl/token")} (EC), {fig("rsa", "curl/token")} (RSA); engine
  {fig("ec", "curl-engine/token")}, {fig("rsa", "curl-engine/token")} of
  the PEM file.  A service that cares keeps the identity in process.  In
  two early runs a curl child with the provider blocked reading its
  standard input (wait channel `anon_pipe_read`) before writing anything;
  the cause was not found; curl now gets `/dev/null` as standard input
  (a prompt would fail instead of hanging) and it was not seen again.
"""


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.handshakes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer, smaller batches (< 60 s)")
    ap.add_argument("--write", action="store_true", help="write HANDSHAKES.md also with --quick")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0
    settings = Settings.quick() if args.quick else Settings()
    results = measure(settings, log=lambda s: print(s, file=sys.stderr))
    page = markdown(results, args.quick)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.write or not args.quick:
        OUTPUT.write_text(page)
        print(f"wrote {OUTPUT.relative_to(ROOT)}", file=sys.stderr)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
