"""Smoke test of the benchmark machinery (benchmarks/): one row of each kind
at a minimal size, so it cannot rot.  No timing assertions: structure, a
number from every implementation, and PKCS#11 call counts equal to what the
C layer makes."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from .conftest import Token

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None or importlib.util.find_spec("PyKCS11") is None,
    reason="the benchmark needs a C compiler and PyKCS11 (the test extra)",
)


def test_benchmark_machinery_minimal(token: Token, tmp_path: Path) -> None:
    from benchmarks import report, runner

    config = runner.Config(
        reps=1,
        batch=2,
        p12_batch=1,
        token_reps=1,
        token_batch=1,
        lookup_reps=1,
        lookup_batch=2,
        fillers=(0,),
        thread_seconds=0.15,
        memory_cycles=10,
        key_types=("ec",),
    )
    bench = runner.Bench(
        token.module, token.label, token.pin, tmp_path, config, log=lambda msg: None
    )
    bench.setup()
    try:
        results = bench.run()
    finally:
        bench.close()

    live = [name for name, reason in results["impls"].items() if reason is None]
    assert runner.LIMIT in live and runner.NATIVE in live and runner.PYKCS11 in live
    for name, reason in results["impls"].items():
        assert reason is None or reason.startswith("not available"), (name, reason)

    rows = results["rows"]
    for key in (
        "cycle_eph_ec",
        "cycle_clear_ec",
        "create_destroy_ec",
        "parse_ec",
        "cycle_tok_ec",
        "lookup_hit_0",
        "lookup_miss_0",
    ):
        assert key in rows, key
        for name in live:
            ms = rows[key]["ms"].get(name)
            assert ms is not None, (key, name)
            if key == "create_destroy_ec" and name in (runner.NATIVE, runner.CTYPES):
                continue  # a difference of two medians: noise may make it < 0 at this size
            assert ms > 0, (key, name, ms)

    calls = results["calls"]["counts"]
    minimum = runner.MINIMUM_CALLS
    # raw C makes exactly the C layer's calls, and that is the minimum
    for name in (runner.LIMIT, runner.NATIVE):
        assert calls[name]["cycle"] == minimum["cycle"] == 16, (name, calls[name])
        assert calls[name]["lookup_hit"] == minimum["lookup_hit"], (name, calls[name])
        assert calls[name]["lookup_miss"] == minimum["lookup_miss"], (name, calls[name])
    assert calls[runner.LIMIT]["cycle_token"] == minimum["cycle_token"]
    assert calls[runner.NATIVE]["cycle_token"] >= minimum["cycle_token"]
    # PyKCS11 reaches the minimum; python-pkcs11 reads 10 attributes of every
    # object it hands back (2 calls each: 2 creates + 2 found in kill)
    assert calls[runner.PYKCS11]["cycle"] == 16
    if runner.PKCS11 in live:
        assert calls[runner.PKCS11]["cycle"] == 16 + 8

    threads = results["threads"]
    for kind in ("enc", "clear"):
        for name in live:
            rates = threads[kind][name]
            assert rates[1] > 0 and rates[2] > 0, (kind, name, rates)
    assert results["memory"], "no memory row"
    for m in results["memory"].values():
        assert m["cycles"] == 10 and m["before_kib"] > 0

    text = report.table(results)
    assert "cycle, ephemeral, EC P-256" in text and "PKCS#11 calls" in text
    assert report.targets(results)
    assert "## Targets" in report.markdown(results, quick=True)
