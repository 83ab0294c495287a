"""Tables, target checks, RESULTS.md and the PNG chart from a results dict.

Every figure here is a measured row (a median with its spread) or a ratio
of two measured rows; nothing is derived as a difference of medians.  A
figure no measurement can produce -- a time or rate that is zero, negative
or not finite, a spread out of order, a ratio with a missing side -- is
rejected: ``validate`` lists them, a target that would rest on one is
reported as "rejected" (never "met"), and ``markdown`` refuses to write a
results page that holds one.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

from .runner import (
    CTYPES,
    FLOOR,
    IMPLS,
    LIMIT,
    MINIMUM_CALLS,
    NATIVE,
    PKCS11,
    PORTS,
    PORTS_OWN_PATH_CALLS,
    PYKCS11,
    SOFTHSM2_ALONE,
    WHEEL,
    WHEEL_FLOOR,
)

NOISE = 0.03  # "never slower": within 3 % counts as a tie (median noise)
CLOSE_TO_FLOOR = 1.25  # a corpus cycle within 1.25x the key derivations alone

MET, NOT_MET, NOT_CHECKED, REJECTED = "met", "not met", "not checked", "rejected"

CALL_OPS = {
    "cycle": "ephemeral cycle",
    "cycle_token": "token-object cycle",
    "lookup_hit": "lookup hit",
    "lookup_miss": "lookup miss",
    "kill_foreign": "kill of another handle's token identity",
}

# A port's figure on its own path (token identities: a CKO_DATA lease object
# where the C layer keeps a lease file): shown, never compared.
OWN_PATH = "own path"


def _compared(row: dict, impl: str) -> bool:
    """Whether impl's figure in row is compared with the C layer's."""
    return impl not in PORTS or row.get("ports_compared", True)


class ImpossibleValue(ValueError):
    """A figure no measurement can produce."""


def positive(x: Any, what: str) -> float:
    """x as a time or rate: a finite number > 0, else ImpossibleValue."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ImpossibleValue(f"{what}: {x!r} is not a number")
    if not math.isfinite(x) or x <= 0:
        raise ImpossibleValue(f"{what}: {x!r} is not a positive time or rate")
    return float(x)


def ratio(a: Any, b: Any, what: str) -> float:
    """a / b of two measured figures; ImpossibleValue if either is missing
    or impossible."""
    if a is None or b is None:
        raise ImpossibleValue(f"{what}: ratio of missing data ({a!r} / {b!r})")
    return positive(a, what) / positive(b, what)


def _n(d: Any, n: int) -> Any:
    """d[n] with int or str keys (the results survive a JSON round trip)."""
    if not isinstance(d, dict):
        return None
    return d.get(n, d.get(str(n)))


# ------------------------------------------------------------- validation


def validate(results: dict) -> list:
    """Every impossible figure in results, as text ([] when all are
    possible)."""
    problems: list[str] = []

    def check(x: Any, what: str) -> None:
        try:
            positive(x, what)
        except ImpossibleValue as exc:
            problems.append(str(exc))

    for key, row in results.get("rows", {}).items():
        for impl, ms in row.get("ms", {}).items():
            n = row.get("n", {}).get(impl)
            if ms is None:
                if n:
                    problems.append(f"{key} / {impl}: {n} samples but no median")
                continue
            check(ms, f"{key} / {impl}")
            sp = row.get("spread", {}).get(impl)
            if sp is None:
                continue
            order = [sp.get(k) for k in ("min", "q1", "median", "q3", "max")]
            for k, v in zip(("min", "q1", "median", "q3", "max"), order):
                check(v, f"{key} / {impl} {k}")
            if all(isinstance(v, (int, float)) for v in order) and order != sorted(order):
                problems.append(f"{key} / {impl}: spread out of order {order}")
    for kind, by_impl in results.get("threads", {}).items():
        if kind == "cpu_control":
            for n in (1, 2):
                check(_n(by_impl, n), f"threads control, {n} thread(s)")
            continue
        for impl, rates in by_impl.items():
            for n in (1, 2):
                check(_n(rates, n), f"threads {kind} / {impl}, {n} thread(s)")
    for n, p in results.get("processes", {}).items():
        check(p.get("rate"), f"processes {n}: aggregate rate")
    for key, m in results.get("memory", {}).items():
        check(m.get("cycles"), f"memory {key} cycles")
        check(m.get("before_kib"), f"memory {key} RSS before")
        check(m.get("after_kib"), f"memory {key} RSS after")
    for impl, c in results.get("calls", {}).get("counts", {}).items():
        for op in ("preauth", "kill", *CALL_OPS):
            if op in c and (isinstance(c[op], bool) or not isinstance(c[op], int) or c[op] <= 0):
                problems.append(f"calls {impl} {op}: {c[op]!r} is not a positive count")
    return problems


# ------------------------------------------------------------------ table


def _unit(ms: float) -> tuple[float, str, int]:
    if ms >= 10:
        return 1.0, "ms", 1
    if ms >= 1:
        return 1.0, "ms", 2
    return 1000.0, "µs", 0


def _fmt(ms: Optional[float]) -> str:
    if ms is None:
        return "—"
    scale, unit, digits = _unit(ms)
    return f"{ms * scale:.{digits}f} {unit}"


def _iqr(sp: Optional[dict], ms: float) -> str:
    """The interquartile range in the median's unit, e.g. "[790–850]"."""
    if not sp:
        return ""
    scale, _, digits = _unit(ms)
    return f" [{sp['q1'] * scale:.{digits}f}–{sp['q3'] * scale:.{digits}f}]"


def _cell(row: dict, impl: str, ref: Optional[float]) -> str:
    ms = row["ms"].get(impl)
    if ms is None:
        return "—"
    try:
        positive(ms, "")
    except ImpossibleValue:
        return f"rejected ({ms!r})"
    text = _fmt(ms) + _iqr(row.get("spread", {}).get(impl), ms)
    if not _compared(row, impl):
        return f"{text} ({OWN_PATH})"
    if impl != NATIVE and ref is not None:
        with contextlib.suppress(ImpossibleValue):
            text += f" ({ratio(ms, ref, ''):.2f}×)"
    return text


def columns(results: dict) -> list:
    return [name for name in IMPLS if name in results["impls"]]


def table(results: dict) -> str:
    """The main table: medians with their interquartile range, and ratios
    to the C extension."""
    cols = columns(results)
    head = ["row", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"].values():
        ref = row["ms"].get(NATIVE)
        cells = ["not available" if results["impls"].get(c) else _cell(row, c, ref) for c in cols]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    calls = results.get("calls", {}).get("counts")
    if calls:
        for op, what in CALL_OPS.items():
            cells = []
            for c in cols:
                if results["impls"].get(c):
                    cells.append("not available")
                elif c in calls and op in calls[c]:
                    own = c in PORTS and op in PORTS_OWN_PATH_CALLS
                    cells.append(f"{calls[c][op]} ({OWN_PATH})" if own else str(calls[c][op]))
                else:
                    cells.append("—")
            minimum = MINIMUM_CALLS.get(op)
            lines.append(
                f"| PKCS#11 calls per {what} (minimum {minimum}) | " + " | ".join(cells) + " |"
            )
    threads = results.get("threads")
    if threads:
        for kind, what in (("enc", "EC, from encrypted p12"), ("clear", "EC, from cleartext p12")):
            for n in (1, 2):
                cells = []
                for c in cols:
                    r = threads.get(kind, {}).get(c)
                    rate, one = _n(r, n), _n(r, 1)
                    if results["impls"].get(c):
                        cells.append("not available")
                    elif rate is None:
                        cells.append("—")
                    else:
                        extra = ""
                        if n == 2:
                            try:
                                extra = f" ({ratio(rate, one, ''):.2f}× 1 thread)"
                            except ImpossibleValue:
                                extra = " (rejected)"
                        cells.append(f"{rate:,.0f}/s{extra}")
                plural = "s" if n > 1 else ""
                lines.append(
                    f"| ephemeral cycles/s, {n} thread{plural}, {what} | "
                    + " | ".join(cells)
                    + " |"
                )
    cpu = (threads or {}).get("cpu_control")
    if cpu:
        c1, c2 = _n(cpu, 1), _n(cpu, 2)
        try:
            fig = f"{c1:,.0f}/s → {c2:,.0f}/s = {ratio(c2, c1, 'control'):.2f}×"
        except (ImpossibleValue, TypeError, ValueError):
            fig = f"rejected ({c1!r} → {c2!r})"
        lines.append(
            f"| control: OpenSSL PBKDF2 (no token), 1 → 2 threads | {fig} |"
            + " |" * (len(cols) - 1)
        )
    procs = results.get("processes") or {}
    for n, p in procs.items():
        one = _n(procs, 1)
        extra = ""
        if str(n) != "1" and one:
            try:
                extra = f" ({ratio(p['rate'], one['rate'], ''):.2f}× 1 process)"
            except ImpossibleValue:
                extra = " (rejected)"
        cells = [f"{p['rate']:,.0f}/s{extra}" if c == NATIVE else "" for c in cols]
        lines.append(
            f"| ephemeral cycles/s, {n} process{'es' if str(n) != '1' else ''} (aggregate), "
            "EC, from encrypted p12 | " + " | ".join(cells) + " |"
        )
    mem = results.get("memory")
    if mem:
        for key, m in mem.items():
            cells = [f"{m['growth_kib'] / 1024:+.2f} MB" if c == m["impl"] else "" for c in cols]
            src = {"enc": "encrypted", "clear": "cleartext"}.get(m["p12"], m["p12"])
            alone = " — SoftHSM2 alone: bare PKCS#11 calls" if key == SOFTHSM2_ALONE else ""
            lines.append(
                f"| RSS growth over {m['cycles']:,} ephemeral cycles "
                f"({src} {m.get('key', '').upper()} p12){alone} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def spread_table(results: dict) -> str:
    """min / q1 / median / q3 / max and the number of samples of every
    timed row and implementation."""
    lines = [
        "| row | implementation | n | min | q1 | median | q3 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"].values():
        for impl in IMPLS:
            sp = row.get("spread", {}).get(impl)
            if not sp:
                continue
            figs = " | ".join(_fmt(sp[k]) for k in ("min", "q1", "median", "q3", "max"))
            lines.append(f"| {row['label']} | {impl} | {row['n'].get(impl)} | {figs} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- targets


def targets(results: dict) -> list:
    """[(target, status, figures)], status one of MET, NOT_MET, NOT_CHECKED
    (a side is missing: nothing is computed) or REJECTED (a figure it
    rests on is impossible)."""
    rows, out = results["rows"], []

    def ms(key: str, impl: str) -> Optional[float]:
        return rows.get(key, {}).get("ms", {}).get(impl)

    def add(name: str, check: Any) -> None:
        """check() -> (ok, figures), ok None when there was nothing to
        check; ImpossibleValue makes it REJECTED."""
        try:
            ok, fig = check()
        except ImpossibleValue as exc:
            out.append((name, REJECTED, str(exc)))
            return
        out.append((name, NOT_CHECKED if ok is None else MET if ok else NOT_MET, fig))

    problems = validate(results)
    out.append(
        (
            "every figure is a possible measurement (times and rates > 0, spreads in order)",
            NOT_MET if problems else MET,
            "; ".join(problems) or "all checked",
        )
    )

    # 1. the binding's overhead: C extension ≤ 1.10× raw C (the same kc_*
    # calls from C) on every row both measured
    for key, row in rows.items():
        a, b = ms(key, NATIVE), ms(key, LIMIT)
        if a is None and b is None:
            continue
        name = f"C extension ≤ 1.10× raw C on {row['label']}"
        if a is None or b is None:
            out.append((name, NOT_CHECKED, f"no figure for {NATIVE if a is None else LIMIT}"))
            continue

        def binding(a: float = a, b: float = b, key: str = key) -> tuple:
            r = ratio(a, b, key)
            return r <= 1.10, f"{_fmt(a)} vs {_fmt(b)} = {r:.2f}×"

        add(name, binding)

    # 2. ≥ 2× faster than each port on the PKCS#11 part (from pre-parsed
    # material) and on lookups
    out.append(
        (
            "C extension ≥ 2× faster than each port on create+destroy from pre-parsed material",
            NOT_CHECKED,
            "keychain.h takes p12 bytes only: the C extension has no pre-parsed entry point",
        )
    )
    for key in ("lookup_hit_0", "lookup_miss_0"):
        a = ms(key, NATIVE)
        if key not in rows:
            continue
        for port in PORTS:
            name = f"C extension ≥ 2× faster than {port} on {rows[key]['label']}"
            if results["impls"].get(port):
                out.append((name, NOT_CHECKED, results["impls"][port]))
                continue
            b = ms(key, port)
            if not _compared(rows[key], port):
                out.append((name, NOT_CHECKED, f"{port} takes its own path on this row"))
                continue
            if a is None or b is None:
                out.append((name, NOT_CHECKED, "a side was not measured"))
                continue

            def faster(a: float = a, b: float = b, key: str = key) -> tuple:
                r = ratio(b, a, key)
                return r >= 2.0, f"{_fmt(b)} vs {_fmt(a)} = {r:.2f}×"

            add(name, faster)

    # 3. never slower than any port on any row both measured
    def never_slower() -> tuple:
        slower, checked = [], 0
        for key, row in rows.items():
            a = row["ms"].get(NATIVE)
            for port in PORTS:
                b = row["ms"].get(port)
                if a is None or b is None or results["impls"].get(port):
                    continue
                if not _compared(row, port):
                    continue  # the port's own path (token identities)
                checked += 1
                if ratio(a, b, f"{key} / {port}") > 1 + NOISE:
                    slower.append(f"{row['label']}: {_fmt(a)} vs {port} {_fmt(b)}")
        if not checked:
            return None, "no row measured by the C extension and a port"
        return not slower, "; ".join(slower) or f"{checked} row/port pairs checked"

    add("C extension never slower than any port on any row (3 % noise allowed)", never_slower)

    # 3b. the corpus: each build of the C extension against the fastest port
    # (never slower) and against the key derivations alone on its OpenSSL
    versions = results.get("openssl", {})
    for key, row in rows.items():
        if not key.startswith("corpus_"):
            continue
        for impl, floor in ((NATIVE, FLOOR), (WHEEL, WHEEL_FLOOR)):
            a = ms(key, impl)
            if a is None:
                continue
            on = f"{impl} ({versions.get(floor, 'OpenSSL ?')})"
            ports = {p: ms(key, p) for p in PORTS if ms(key, p) is not None}
            if ports:
                best = min(ports, key=lambda p: ports[p])

                def vs_port(
                    a: float = a, b: float = ports[best], p: str = best, key: str = key
                ) -> tuple:
                    r = ratio(a, b, key)
                    return r <= 1 + NOISE, f"{_fmt(a)} vs {p} {_fmt(b)} = {r:.2f}×"

                add(f"{on} never slower than the fastest port on {row['label']}", vs_port)
            f = ms(key, floor)
            if f is not None:

                def vs_floor(a: float = a, f: float = f, key: str = key) -> tuple:
                    r = ratio(a, f, key)
                    return r <= CLOSE_TO_FLOOR, f"{_fmt(a)} vs floor {_fmt(f)} = {r:.2f}×"

                add(f"{on} ≤ {CLOSE_TO_FLOOR}× its KDF floor on {row['label']}", vs_floor)

    # 4. PKCS#11 calls: at the minimum, and raw C the same as the C extension
    calls = results.get("calls", {}).get("counts", {})
    if NATIVE in calls:
        c = calls[NATIVE]
        out.append(
            (
                "PKCS#11 calls at the minimum (no redundant finds or attribute reads)",
                MET if all(c.get(k) == MINIMUM_CALLS[k] for k in CALL_OPS) else NOT_MET,
                ", ".join(f"{k} {c.get(k)} (min {MINIMUM_CALLS[k]})" for k in CALL_OPS),
            )
        )
        if LIMIT in calls:
            same = [k for k in CALL_OPS if calls[LIMIT].get(k) != c.get(k)]
            out.append(
                (
                    "raw C makes exactly the C extension's PKCS#11 calls (same kc_* code)",
                    NOT_MET if same else MET,
                    "; ".join(f"{k}: raw C {calls[LIMIT].get(k)} vs {c.get(k)}" for k in same)
                    or f"{len(CALL_OPS)} operations compared",
                )
            )

    # 5. threads
    th = results.get("threads", {})
    for kind, what in (("enc", "from encrypted p12"), ("clear", "from cleartext p12")):
        r = th.get(kind, {}).get(NATIVE)
        if not r:
            continue

        def scale(r: dict = r, kind: str = kind) -> tuple:
            one, two = _n(r, 1), _n(r, 2)
            x = ratio(two, one, f"threads {kind}")
            why = ""
            lim = th[kind].get(LIMIT)
            if x < 1.5 and _n(lim, 1) and _n(lim, 2):
                lx = ratio(_n(lim, 2), _n(lim, 1), f"threads {kind} raw C")
                why = (
                    f"; raw C without Python: {_n(lim, 1):,.0f}/s → {_n(lim, 2):,.0f}/s = {lx:.2f}×"
                )
            cpu = th.get("cpu_control", {})
            if x < 1.5 and _n(cpu, 1) and _n(cpu, 2):
                cx = ratio(_n(cpu, 2), _n(cpu, 1), "threads control")
                why += f"; this machine runs pure OpenSSL PBKDF2 on 2 threads at {cx:.2f}× one"
            return x >= 1.5, f"{one:,.0f}/s → {two:,.0f}/s = {x:.2f}×{why}"

        add(f"2 threads ≥ 1.5× one thread, ephemeral, {what}", scale)

    # 6. memory
    mem = results.get("memory", {})
    raw = next((m for m in mem.values() if m["impl"] == LIMIT), None)
    alone = mem.get(SOFTHSM2_ALONE)
    for key, m in mem.items():
        if m["impl"] != NATIVE:
            continue
        full = m["cycles"] >= 20000
        name = f"RSS growth < 2 MB over 20,000 cycles ({key})" + (
            "" if full else f" — only {m['cycles']:,} cycles in this run"
        )

        def growth(m: dict = m) -> tuple:
            """Our code's growth: the extension's, less SoftHSM2's own over
            the same number of bare PKCS#11 cycles when that was measured."""
            positive(m["cycles"], "memory cycles")
            ours, why = m["growth_kib"], ""
            if alone and (alone["cycles"], alone["key"]) == (m["cycles"], m.get("key")):
                ours -= max(0, alone["growth_kib"])
                why = (
                    f" minus SoftHSM2 alone (bare PKCS#11 calls, PyKCS11) "
                    f"{alone['growth_kib'] / 1024:+.2f} MB = {ours / 1024:+.2f} MB ours"
                )
            if raw and ours >= 2048:
                why += (
                    f"; raw C (the same kc_* cycle without Python): "
                    f"{raw['growth_kib'] / 1024:+.2f} MB"
                )
            return ours < 2048, f"{m['growth_kib'] / 1024:+.2f} MB{why}"

        add(name, growth)
    return out


def targets_text(results: dict) -> str:
    return "\n".join(f"- **{status}** — {name}: {fig}" for name, status, fig in targets(results))


def calls_detail(results: dict) -> str:
    calls = results.get("calls", {}).get("counts", {})
    lines = []
    for name in IMPLS:
        c = calls.get(name)
        if not c:
            continue
        parts = []
        for op in ("preauth", "kill", "cycle_token", "lookup_hit", "kill_foreign"):
            by = c.get(f"{op}_by_function")
            if by:
                parts.append(
                    f"{op} {c[op]} = "
                    + ", ".join(f"{k.removeprefix('C_')} {v}" for k, v in sorted(by.items()))
                )
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------- outputs


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(dist)
        except Exception:
            return "not installed"

    def dpkg(pkg: str) -> str:
        try:
            cmd = ["dpkg-query", "-W", "-f=${Version}", pkg]
            return subprocess.run(cmd, capture_output=True, text=True).stdout or "?"
        except OSError:
            return "?"

    import ssl

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "softhsm2": dpkg("softhsm2"),
        "openssl": ssl.OPENSSL_VERSION,
        "keychain_ext": version("keychain_ext"),
        "cryptography": version("cryptography"),
        "python-pkcs11": version("python-pkcs11"),
        "PyKCS11": version("PyKCS11"),
        "cffi": version("cffi"),
    }


def _load(load: Any) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "?"


def _parse_lines(results: dict) -> str:
    lines = []
    for kt, p in results.get("parse", {}).items():
        figs = []
        for kind, what in (("enc", "encrypted"), ("clear", "cleartext")):
            sp = (p.get(kind) or {}).get("cryptography")
            if sp:
                figs.append(
                    f"{what} p12 {_fmt(sp['median'])} (min {_fmt(sp['min'])}, "
                    f"max {_fmt(sp['max'])})"
                )
        if figs:
            lines.append(f"- {kt.upper()}, cryptography (the Python ports): " + "; ".join(figs))
    lines.append(
        "- OpenSSL (the C layer): not measured alone — keychain.h has no parse-only entry "
        "point, and a figure derived from two cycle rows would be a difference of medians."
    )
    return "\n".join(lines)


def markdown(results: dict, quick: bool) -> str:
    """RESULTS.md; ImpossibleValue if any figure is impossible."""
    problems = validate(results)
    if problems:
        raise ImpossibleValue("; ".join(problems))
    m = machine()
    versions = (
        f"Python {m['python']}, SoftHSM2 {m['softhsm2']}, {m['openssl']}, "
        f"keychain_ext {m['keychain_ext']},\ncffi {m['cffi']}, cryptography {m['cryptography']}, "
        f"python-pkcs11 {m['python-pkcs11']}, PyKCS11 {m['PyKCS11']}"
    )
    avail = "\n".join(f"- {k}: {v}" for k, v in results["impls"].items() if v)
    return f"""# keychain_ext benchmark results

Generated by `python -m benchmarks`{" --quick" if quick else ""} — do not edit; run it again.

Machine: {m["cpu"]}, {m["cores"]} cores, {m["os"]} · {m["date"]}
Versions: {versions}.
OpenSSL linked: {"; ".join(f"{k}: {v}" for k, v in results.get("openssl", {}).items()) or "?"}.
Run time: {results["seconds"]:.0f} s; load average (1/5/15 min) before
{_load(results.get("load_before"))}, after {_load(results.get("load_after"))} — other
work on this shared machine shows up as noise in every column alike.

Medians, in square brackets the interquartile range (same unit), in round
brackets the ratio of medians to the C extension (lower is faster).  Raw C
is benchmarks/kc_bench.c: the C layer's own kc_* functions, built from the
same sources with the same flags, called in a loop without Python, so the
C extension / raw C ratio is the binding's cost.  One fresh SoftHSM2 token
(file object store in a temp dir on tmpfs), all implementations in one
process, interleaved round-robin per repetition.

{table(results)}

"({OWN_PATH})": the ports' token-object path is their own — a CKO_DATA lease
object on the token, what the C layer did before its leases became files in
the token's state directory — so those figures are reported, not compared
(no ratio, no target).

{("Not measured:" + chr(10) + avail) if avail else ""}

## Targets (issue 14)

{targets_text(results)}

## Spread of every timed row

{spread_table(results)}

## PKCS#11 calls, by function (one operation, counted by tests/p11shim)

{calls_detail(results)}

## p12 parsing

{_parse_lines(results)}

See benchmarks/README.md for what is measured and how to read it.
"""


def chart(results: dict, path: Path) -> bool:
    """A grouped bar chart (log scale) of the timed rows, medians with
    interquartile whiskers; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = [c for c in columns(results) if not results["impls"].get(c)]
    rows = [(k, r) for k, r in results["rows"].items() if not k.startswith("parse")]
    fig, ax = plt.subplots(figsize=(13, 6.5))
    width = 0.8 / max(1, len(cols))
    colors = {
        LIMIT: "#444444",
        NATIVE: "#1f77b4",
        CTYPES: "#9467bd",
        PKCS11: "#ff7f0e",
        PYKCS11: "#2ca02c",
        FLOOR: "#bbbbbb",
        WHEEL: "#17becf",
        WHEEL_FLOOR: "#9edae5",
    }
    for i, c in enumerate(cols):
        xs, ys, lo, hi = [], [], [], []
        for j, (_, r) in enumerate(rows):
            med, sp = r["ms"].get(c), (r.get("spread") or {}).get(c)
            if med is None:
                continue
            xs.append(j + (i - (len(cols) - 1) / 2) * width)
            ys.append(med)
            lo.append(med - sp["q1"] if sp else 0)
            hi.append(sp["q3"] - med if sp else 0)
        ax.bar(xs, ys, width, yerr=[lo, hi], label=c, color=colors.get(c), capsize=1.5)
    ax.set_yscale("log")
    ax.set_ylabel("median time per operation (ms, log scale), IQR whiskers")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(
        [r["label"].replace(", ", "\n", 1) for _, r in rows], rotation=60, ha="right", fontsize=7
    )
    ax.legend()
    ax.set_title("keychain_ext on SoftHSM2: C extension vs raw C (same kc_* code) vs Python ports")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
