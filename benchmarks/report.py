"""Tables, target checks, RESULTS.md and the PNG chart from a results dict."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

from .runner import CTYPES, IMPLS, LIMIT, MINIMUM_CALLS, NATIVE, PKCS11, PORTS, PYKCS11

NOISE = 0.03  # "never slower": within 3 % counts as a tie (median noise)


def _fmt(ms: Optional[float]) -> str:
    if ms is None:
        return "—"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1000:.0f} µs"


def _cell(ms: Optional[float], ref: Optional[float]) -> str:
    if ms is None:
        return "—"
    if ref in (None, 0) or ms is ref:
        return _fmt(ms)
    return f"{_fmt(ms)} ({ms / ref:.2f}×)"


def columns(results: dict) -> list:
    return [name for name in IMPLS if name in results["impls"]]


def table(results: dict) -> str:
    """The main table: medians, and ratios to the C extension."""
    cols = columns(results)
    head = ["row", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in results["rows"].items():
        ref = row["ms"].get(NATIVE)
        cells = []
        for c in cols:
            if results["impls"].get(c):
                cells.append("not available")
            else:
                ms = row["ms"].get(c)
                cells.append(_fmt(ms) if c == NATIVE else _cell(ms, ref))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    calls = results.get("calls", {}).get("counts")
    if calls:
        for op in ("cycle", "cycle_token", "lookup_hit", "lookup_miss", "kill_foreign"):
            cells = []
            for c in cols:
                if results["impls"].get(c):
                    cells.append("not available")
                elif c in calls and op in calls[c]:
                    cells.append(str(calls[c][op]))
                else:
                    cells.append("—")
            minimum = MINIMUM_CALLS.get(op)
            what = {"cycle": "ephemeral cycle", "cycle_token": "token-object cycle",
                    "lookup_hit": "lookup hit", "lookup_miss": "lookup miss",
                    "kill_foreign": "kill of another handle's token identity"}[op]
            lines.append(f"| PKCS#11 calls per {what} (minimum {minimum}) | "
                         + " | ".join(cells) + " |")
    threads = results.get("threads")
    if threads:
        for kind, what in (("enc", "EC, from encrypted p12"), ("clear", "EC, excl. parse")):
            for n in (1, 2):
                cells = []
                for c in cols:
                    r = threads.get(kind, {}).get(c)
                    if results["impls"].get(c):
                        cells.append("not available")
                    elif not r:
                        cells.append("—")
                    else:
                        rate = r.get(n) or r.get(str(n))
                        one = r.get(1) or r.get("1")
                        extra = f" ({rate / one:.2f}× 1 thread)" if n == 2 else ""
                        cells.append(f"{rate:,.0f}/s{extra}")
                lines.append(f"| ephemeral cycles/s, {n} thread{'s' if n > 1 else ''}, {what} | "
                             + " | ".join(cells) + " |")
    cpu = (threads or {}).get("cpu_control")
    if cpu:
        c1, c2 = cpu.get(1) or cpu.get("1"), cpu.get(2) or cpu.get("2")
        lines.append(f"| control: OpenSSL PBKDF2 (no token), 1 → 2 threads | "
                     f"{c1:,.0f}/s → {c2:,.0f}/s = {c2 / c1:.2f}× |" + " |" * (len(cols) - 1))
    mem = results.get("memory")
    if mem:
        for key, m in mem.items():
            cells = []
            for c in cols:
                cells.append(f"{m['growth_kib'] / 1024:+.2f} MB" if c == m["impl"] else "")
            src = {"enc": "encrypted", "clear": "cleartext"}.get(m["p12"], m["p12"])
            lines.append(f"| RSS growth over {m['cycles']:,} ephemeral cycles "
                         f"({src} {m.get('key', '').upper()}{' p12' if m['p12'] != 'pre-parsed' else ''}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict) -> list:
    """[(target, met: bool|None, figures)] — None: could not be checked."""
    rows, out = results["rows"], []
    avail = [p for p in PORTS if not results["impls"].get(p)]

    def ms(key: str, impl: str) -> Optional[float]:
        return rows.get(key, {}).get("ms", {}).get(impl)

    # 1. C extension vs raw C: the same work on both sides (cycle from the
    # same p12 bytes, lookup); excl. parse is derived from these
    for key, limit in (("cycle_clear_rsa", 1.10), ("cycle_clear_ec", 1.10),
                       ("cycle_eph_rsa", 1.10), ("cycle_eph_ec", 1.10),
                       ("lookup_hit_0", 1.25)):
        a, b = ms(key, NATIVE), ms(key, LIMIT)
        if a is None or b is None:
            continue
        out.append((f"C extension ≤ {limit:.2f}× raw C on {rows[key]['label']}",
                    a / b <= limit, f"{_fmt(a)} vs {_fmt(b)} = {a / b:.2f}×"))
    for key in ("create_destroy_rsa", "create_destroy_ec"):
        a, b = ms(key, NATIVE), ms(key, LIMIT)
        if a is not None and b is not None:
            out.append((f"(derived) C extension ≤ 1.10× raw C on {rows[key]['label']}",
                        a / b <= 1.10, f"{_fmt(a)} vs {_fmt(b)} = {a / b:.2f}×"))
    # 2. ≥ 2× faster than each port on create/destroy and lookup
    for key in ("create_destroy_rsa", "create_destroy_ec", "lookup_hit_0", "lookup_miss_0"):
        a = ms(key, NATIVE)
        if a is None:
            continue
        for port in PORTS:
            if results["impls"].get(port):
                out.append((f"C extension ≥ 2× faster than {port} on {key}", None,
                            results["impls"][port]))
                continue
            b = ms(key, port)
            if b is None:
                continue
            out.append((f"C extension ≥ 2× faster than {port} on {rows[key]['label']}",
                        b / a >= 2.0, f"{_fmt(b)} vs {_fmt(a)} = {b / a:.2f}×"))
    # 3. never slower than any port on any row
    slower = []
    for key, row in rows.items():
        a = row["ms"].get(NATIVE)
        if a is None:
            continue
        for port in avail:
            b = row["ms"].get(port)
            if b is not None and a > b * (1 + NOISE):
                slower.append(f"{row['label']}: {_fmt(a)} vs {port} {_fmt(b)}")
    out.append(("C extension never slower than any port on any row (3 % noise allowed)",
                not slower, "; ".join(slower) or f"{len(rows)} rows checked"))
    # 4. calls at the minimum
    calls = results.get("calls", {}).get("counts", {})
    if NATIVE in calls:
        c = calls[NATIVE]
        keys = ("cycle", "cycle_token", "lookup_hit", "lookup_miss", "kill_foreign")
        ok = all(c.get(k) == MINIMUM_CALLS[k] for k in keys)
        out.append(("PKCS#11 calls at the minimum (no redundant finds or attribute reads)", ok,
                    ", ".join(f"{k} {c.get(k)} (min {MINIMUM_CALLS[k]})" for k in keys)))
    # 5. threads
    th = results.get("threads", {})
    for kind, what in (("enc", "from p12 bytes"), ("clear", "excl. parse")):
        r = th.get(kind, {}).get(NATIVE)
        if r:
            one, two = r.get(1) or r.get("1"), r.get(2) or r.get("2")
            lim = th[kind].get(LIMIT, {})
            l1, l2 = lim.get(1) or lim.get("1"), lim.get(2) or lim.get("2")
            why = ""
            if two / one < 1.5 and l1 and l2:
                why = (f"; raw C without Python: {l1:,.0f}/s → {l2:,.0f}/s = {l2 / l1:.2f}×, "
                       "so the token serializes (see README)")
            cpu = th.get("cpu_control", {})
            c1, c2 = cpu.get(1) or cpu.get("1"), cpu.get(2) or cpu.get("2")
            if two / one < 1.5 and c1 and c2:
                why += (f"; and this machine runs even pure OpenSSL PBKDF2 on 2 threads at "
                        f"only {c2 / c1:.2f}× one thread")
            out.append((f"2 threads ≥ 1.5× one thread, ephemeral, {what}", two / one >= 1.5,
                        f"{one:,.0f}/s → {two:,.0f}/s = {two / one:.2f}×{why}"))
    # 6. memory
    mem = results.get("memory", {})
    raw = next((m for m in mem.values() if m["impl"] == LIMIT), None)
    for key, m in mem.items():
        if m["impl"] != NATIVE:
            continue
        full = m["cycles"] >= 20000
        why = (f"; raw C without any binding, same cycles: {raw['growth_kib'] / 1024:+.2f} MB "
               "(SoftHSM2's own)") if raw and m["growth_kib"] >= 2048 else ""
        out.append((f"RSS growth < 2 MB over 20,000 cycles ({key})"
                    + ("" if full else f" — only {m['cycles']:,} cycles in this run"),
                    m["growth_kib"] < 2048, f"{m['growth_kib'] / 1024:+.2f} MB{why}"))
    return out


def targets_text(results: dict) -> str:
    lines = []
    for name, met, fig in targets(results):
        mark = "met" if met else ("not met" if met is not None else "not checked")
        lines.append(f"- **{mark}** — {name}: {fig}")
    return "\n".join(lines)


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
                parts.append(f"{op} {c[op]} = " + ", ".join(
                    f"{k.removeprefix('C_')} {v}" for k, v in sorted(by.items())))
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines)


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
            return subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                                  text=True).stdout or "?"
        except OSError:
            return "?"

    import ssl
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "softhsm2": dpkg("softhsm2"), "openssl": ssl.OPENSSL_VERSION,
        "keychain_ext": version("keychain_ext"), "cryptography": version("cryptography"),
        "python-pkcs11": version("python-pkcs11"), "PyKCS11": version("PyKCS11"),
        "cffi": version("cffi"),
    }


def _load(load: Any) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "?"


def markdown(results: dict, quick: bool) -> str:
    m = machine()
    avail = "\n".join(f"- {k}: {v}" for k, v in results["impls"].items() if v)
    parse = results.get("parse", {})
    parse_lines = "\n".join(
        f"- {kt.upper()}: encrypted p12 — OpenSSL {_fmt(p['enc']['OpenSSL'])}, cryptography "
        f"{_fmt(p['enc']['cryptography'])}; cleartext p12 — OpenSSL {_fmt(p['clear']['OpenSSL'])}, "
        f"cryptography {_fmt(p['clear']['cryptography'])}" for kt, p in parse.items())
    return f"""# keychain_ext benchmark results

Generated by `python -m benchmarks`{' --quick' if quick else ''} — do not edit; run it again.

Machine: {m['cpu']}, {m['cores']} cores, {m['os']} · {m['date']}
Versions: Python {m['python']}, SoftHSM2 {m['softhsm2']}, {m['openssl']}, keychain_ext {m['keychain_ext']},
cffi {m['cffi']}, cryptography {m['cryptography']}, python-pkcs11 {m['python-pkcs11']}, PyKCS11 {m['PyKCS11']}.
Run time: {results['seconds']:.0f} s; load average (1/5/15 min) before
{_load(results.get('load_before'))}, after {_load(results.get('load_after'))} — other
work on this shared machine shows up as noise in every column alike.

Medians; in brackets the ratio to the C extension (lower is faster).  One
fresh SoftHSM2 token (file object store in a temp dir on tmpfs),
all implementations in one process, interleaved round-robin per repetition.

{table(results)}

{('Not measured:' + chr(10) + avail) if avail else ''}

## Targets (issue 5)

{targets_text(results)}

## PKCS#11 calls, by function (one operation, counted by tests/p11shim)

{calls_detail(results)}

## p12 parsing

{parse_lines}

See benchmarks/README.md for what is measured and how to read it.
"""


def chart(results: dict, path: Path) -> bool:
    """A grouped bar chart (log scale) of the timed rows; False without
    matplotlib."""
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
    colors = {LIMIT: "#444444", NATIVE: "#1f77b4", CTYPES: "#9467bd", PKCS11: "#ff7f0e",
              PYKCS11: "#2ca02c"}
    for i, c in enumerate(cols):
        xs = [j + (i - (len(cols) - 1) / 2) * width for j in range(len(rows))]
        ys = [r["ms"].get(c) or 0 for _, r in rows]
        ax.bar(xs, ys, width, label=c, color=colors.get(c))
    ax.set_yscale("log")
    ax.set_ylabel("median time per operation (ms, log scale)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["label"].replace(", ", "\n", 1) for _, r in rows], rotation=60,
                       ha="right", fontsize=7)
    ax.legend()
    ax.set_title("keychain_ext on SoftHSM2: C extension vs raw C vs Python ports")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
