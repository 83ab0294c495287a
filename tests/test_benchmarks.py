"""Smoke test of the benchmark machinery (benchmarks/): one row of each kind
at a minimal size, so it cannot rot.  No timing assertions: structure, a
number from every implementation, and PKCS#11 call counts equal to what the
C layer makes."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest

from .conftest import Token

ROOT = Path(__file__).resolve().parent.parent

needs_toolchain = pytest.mark.skipif(
    shutil.which("cc") is None or importlib.util.find_spec("PyKCS11") is None,
    reason="the benchmark needs a C compiler and PyKCS11 (the test extra)",
)


@needs_toolchain
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
        corpus=(2048,),
        corpus_reps=1,
        processes=(1, 2),
        process_seconds=0.2,
    )
    bench = runner.Bench(
        token.module, token.label, token.pin, tmp_path, config, log=lambda msg: None
    )
    bench.setup()
    try:
        results = bench.run()
    finally:
        bench.close()

    corpus_only = (runner.FLOOR, runner.WHEEL, runner.WHEEL_FLOOR)  # columns of corpus rows
    live = [n for n, reason in results["impls"].items() if reason is None and n not in corpus_only]
    assert runner.LIMIT in live and runner.NATIVE in live and runner.PYKCS11 in live
    for name, reason in results["impls"].items():
        assert reason is None or reason.startswith("not available"), (name, reason)

    rows = results["rows"]
    # the same kc_* work on both sides: raw C and the C extension in every
    # row that starts from p12 bytes, and in lookups and lists
    for key in (
        "cycle_eph_ec",
        "cycle_clear_ec",
        "cycle_tok_ec",
        "lookup_hit_0",
        "lookup_miss_0",
        "list_0",
    ):
        assert key in rows, key
        names = live if not key.startswith("list") else [runner.LIMIT, runner.NATIVE]
        for name in names:
            ms = rows[key]["ms"].get(name)
            assert ms is not None and ms > 0, (key, name, ms)
            sp = rows[key]["spread"][name]
            assert 0 < sp["min"] <= sp["q1"] <= sp["median"] <= sp["q3"] <= sp["max"], sp
    # measured directly from pre-parsed material, by the ports only: no
    # figure derived for the C extension or raw C (keychain.h takes p12 bytes)
    for key in ("create_destroy_ec", "parse_ec"):
        assert rows[key]["ms"].get(runner.PYKCS11, 0) > 0, key
        assert runner.NATIVE not in rows[key]["ms"] and runner.LIMIT not in rows[key]["ms"]

    # the corpus row: every implementation, raw C and the KDF floor of the
    # extension's OpenSSL; the wheel only when a wheel file is named
    corpus = rows["corpus_ec_2048"]
    for name in [*live, runner.FLOOR]:
        assert corpus["ms"].get(name, 0) > 0, (name, corpus["ms"])
    if not os.environ.get("KEYCHAIN_EXT_BENCH_WHEEL"):
        assert runner.WHEEL not in corpus["ms"]
        assert results["impls"][runner.WHEEL].startswith("not available")
    assert results["openssl"][runner.FLOOR].startswith("OpenSSL ")

    calls = results["calls"]["counts"]
    minimum = runner.MINIMUM_CALLS
    # raw C runs the C layer's own code: exactly the C extension's calls
    for op in ("preauth", "kill", "cycle", "cycle_token", "lookup_hit", "lookup_miss"):
        assert calls[runner.LIMIT][op] == calls[runner.NATIVE][op], (op, calls[runner.LIMIT])
    assert calls[runner.LIMIT]["kill_foreign"] == calls[runner.NATIVE]["kill_foreign"]
    # every operation starts with C_GetSessionInfo (the C layer's ensure_login)
    for op in ("preauth", "kill", "cycle_token", "lookup_hit"):
        assert calls[runner.NATIVE][f"{op}_by_function"]["C_GetSessionInfo"] >= 1, op
    assert calls[runner.NATIVE]["cycle"] == minimum["cycle"] == 17, calls[runner.NATIVE]
    for op in ("preauth", "kill", "lookup_hit", "lookup_miss", "kill_foreign"):
        assert calls[runner.NATIVE][op] == minimum[op], (op, calls[runner.NATIVE])
    assert calls[runner.NATIVE]["cycle_token"] >= minimum["cycle_token"]
    # the ports make the C layer's calls on an ephemeral identity and on
    # lookups (tests/test_benchmark_ports.py checks the order); on token
    # identities they take their own path, reported but not compared
    assert runner.PORTS_OWN_PATH_CALLS == ("cycle_token",)
    assert results["calls"]["ports_own_path"] == ["cycle_token"]
    for port in (runner.CTYPES, runner.PYKCS11):
        for op in ("preauth", "kill", "cycle", "lookup_hit", "lookup_miss"):
            assert calls[port][op] == calls[runner.NATIVE][op], (port, op, calls[port])
        assert calls[port]["cycle_token"] > 0 and "kill_foreign" not in calls[port]
    # python-pkcs11 reads 10 attributes of every object it hands back (2
    # calls each: the 2 creates, and the 2 objects kill finds, in place of
    # the C layer's 2 CKA_CLASS reads)
    if runner.PKCS11 in live:
        assert calls[runner.PKCS11]["cycle"] == 17 + 6

    threads = results["threads"]
    for kind in ("enc", "clear"):
        for name in live:
            rates = threads[kind][name]
            assert rates[1] > 0 and rates[2] > 0, (kind, name, rates)
    assert results["memory"], "no memory row"
    for m in results["memory"].values():
        assert m["cycles"] == 10 and m["before_kib"] > 0
    # SoftHSM2's own growth, by bare PKCS#11 calls without keychain_ext
    assert results["memory"][runner.SOFTHSM2_ALONE]["impl"] == runner.PYKCS11
    procs = results["processes"]
    assert procs[1]["cycles"] > 0 and procs[2]["cycles"] > 0 and procs[2]["rate"] > 0, procs

    text = report.table(results)
    assert "cycle, ephemeral, EC P-256" in text and "PKCS#11 calls" in text
    # token-object rows: the ports' figures are shown, without a ratio to
    # the C extension, and no target compares them
    assert rows["cycle_tok_ec"]["ports_compared"] is False
    assert rows["cycle_eph_ec"]["ports_compared"] is True
    token_line = next(line for line in text.splitlines() if "cycle, token objects" in line)
    assert token_line.count(f"({report.OWN_PATH})") == len(set(live) & set(runner.PORTS))
    calls_line = next(line for line in text.splitlines() if "token-object cycle" in line)
    assert calls_line.count(f"({report.OWN_PATH})") == len(set(live) & set(runner.PORTS))
    assert report.validate(results) == []
    targets = report.targets(results)
    assert all(status != report.REJECTED for _, status, _ in targets), targets
    same = [t for t in targets if t[0].startswith("raw C makes exactly")]
    assert same and same[0][1] == report.MET, same
    page = report.markdown(results, quick=True)
    assert "## Targets" in page and "## Spread" in page


def test_raw_c_driver_is_the_c_layer() -> None:
    """The raw-C column cannot drift: kc_bench.c makes no PKCS#11 or OpenSSL
    call of its own, and it is built from the sources build_ffi names."""
    from benchmarks import runner

    text = (ROOT / "benchmarks" / "kc_bench.c").read_text()
    code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    own = re.findall(r"\b(C_[A-Z]\w*|(?:PKCS12|EVP|X509|OSSL|BN|d2i|i2d)_\w+)\s*\(", code)
    assert own == [], own
    for fn in ("kc_open", "kc_preauth_key", "kc_kill_key", "kc_lookup_keychain_item"):
        assert fn + "(" in code, fn
    assert '#include "keychain.h"' in code

    build = runner.c_layer_build()
    spec = importlib.util.spec_from_file_location("_bf", ROOT / "csrc" / "build_ffi.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    assert build["sources"] == [runner._csrc_path(p) for p in mod.PKCS11_SOURCES]
    for flag in ("-Wall", "-Wextra", "-Werror"):
        assert flag in build["cflags"], flag
    assert any(f.startswith("-DKC_VERSION=") for f in build["cflags"])
    assert {"-ldl", "-lpthread"} <= set(build["libs"])
    # libcrypto as the extension gets it: the system's, or a static one
    assert "-lcrypto" in build["libs"] or any(x.endswith("libcrypto.a") for x in build["libs"])


def _results(native_ms: float, raw_ms: float) -> dict:
    """A minimal results dict: one row, C extension and raw C."""
    from benchmarks import runner

    def sp(ms: float) -> dict:
        return {"min": ms, "q1": ms, "median": ms, "q3": ms, "max": ms}

    row = {
        "label": "cycle from cleartext p12, ephemeral, EC P-256",
        "group": "cycle",
        "note": "",
        "ms": {runner.NATIVE: native_ms, runner.LIMIT: raw_ms},
        "n": {runner.NATIVE: 1, runner.LIMIT: 1},
        "spread": {runner.NATIVE: sp(native_ms), runner.LIMIT: sp(raw_ms)},
    }
    return {
        "impls": {runner.LIMIT: None, runner.NATIVE: None},
        "rows": {"cycle_clear_ec": row},
        "calls": {},
        "threads": {},
        "memory": {},
        "parse": {},
        "seconds": 1.0,
    }


@pytest.mark.parametrize("bad", [-0.019, 0.0, float("nan"), float("inf")])
def test_report_rejects_impossible_values(bad: float) -> None:
    """A negative or zero time (what a difference of two medians produced)
    is never scored "met", and no results page is written from it."""
    from benchmarks import report

    good = _results(1.4, 1.3)
    assert report.validate(good) == []
    status = {name: st for name, st, _ in report.targets(good)}
    assert status["C extension ≤ 1.10× raw C on cycle from cleartext p12, ephemeral, EC P-256"] == (
        report.MET
    )

    results = _results(bad, 1.3)
    assert report.validate(results)
    targets = report.targets(results)
    status = {name: st for name, st, _ in targets}
    name = "C extension ≤ 1.10× raw C on cycle from cleartext p12, ephemeral, EC P-256"
    assert status[name] == report.REJECTED, targets
    assert report.MET not in {st for _, st, _ in targets[1:]}, targets
    assert targets[0][1] == report.NOT_MET  # "every figure is a possible measurement"
    with pytest.raises(report.ImpossibleValue):
        report.markdown(results, quick=True)
    assert "rejected" in report.table(results)


def test_report_refuses_a_ratio_of_missing_data() -> None:
    from benchmarks import report

    with pytest.raises(report.ImpossibleValue):
        report.ratio(1.0, None, "x")
    with pytest.raises(report.ImpossibleValue):
        report.ratio(1.0, -2.0, "x")
    results = _results(1.4, 1.3)
    del results["rows"]["cycle_clear_ec"]["ms"]["raw C"]
    status = {name: st for name, st, _ in report.targets(results)}
    name = "C extension ≤ 1.10× raw C on cycle from cleartext p12, ephemeral, EC P-256"
    assert status[name] == report.NOT_CHECKED


def test_report_scores_the_corpus_from_its_rows() -> None:
    """Per corpus file and build: never slower than the fastest port, and
    within CLOSE_TO_FLOOR of its own OpenSSL's key derivations; computed
    from the rows, a missing wheel never scored."""
    from benchmarks import report, runner

    def sp(ms: float) -> dict:
        return {"min": ms, "q1": ms, "median": ms, "q3": ms, "max": ms}

    ms = {
        runner.NATIVE: 30.0,  # slower than the fastest port, 1.2x its floor
        runner.FLOOR: 25.0,
        runner.CTYPES: 12.0,
        runner.PYKCS11: 11.0,
        runner.WHEEL: 10.0,  # faster than every port, 2x its floor
        runner.WHEEL_FLOOR: 5.0,
    }
    row = {
        "label": "cycle, 20,000 PBKDF2 iterations, EC P-256",
        "group": "corpus",
        "note": "",
        "ms": ms,
        "n": {k: 1 for k in ms},
        "spread": {k: sp(v) for k, v in ms.items()},
    }
    results = {
        **_results(1.4, 1.3),
        "rows": {"corpus_ec_20000": row},
        "openssl": {runner.FLOOR: "OpenSSL 3.0", runner.WHEEL_FLOOR: "OpenSSL 3.5"},
    }
    status = {name: (st, fig) for name, st, fig in report.targets(results)}
    label = row["label"]
    native = f"{runner.NATIVE} (OpenSSL 3.0)"
    wheel = f"{runner.WHEEL} (OpenSSL 3.5)"
    assert status[f"{native} never slower than the fastest port on {label}"][0] == report.NOT_MET
    assert "PyKCS11" in status[f"{native} never slower than the fastest port on {label}"][1]
    assert status[f"{native} ≤ 1.25× its KDF floor on {label}"][0] == report.MET
    assert status[f"{wheel} never slower than the fastest port on {label}"][0] == report.MET
    assert status[f"{wheel} ≤ 1.25× its KDF floor on {label}"][0] == report.NOT_MET

    ms[runner.WHEEL_FLOOR] = -1.0  # impossible: rejected, never met
    status = {name: st for name, st, _ in report.targets(results)}
    assert status[f"{wheel} ≤ 1.25× its KDF floor on {label}"] == report.REJECTED

    del ms[runner.WHEEL], ms[runner.WHEEL_FLOOR]  # no wheel: nothing scored for it
    assert not [n for n, _, _ in report.targets(results) if n.startswith(runner.WHEEL)]


def test_report_memory_target_counts_our_share() -> None:
    """RSS growth target: the extension's growth less SoftHSM2's own over the
    same cycles and key type (bare PKCS#11 calls); other rows are not
    discounted."""
    from benchmarks import report, runner

    def mem(impl: str, key: str, growth: int) -> dict:
        return {
            "impl": impl,
            "p12": "clear",
            "key": key,
            "cycles": 20000,
            "before_kib": 50000,
            "after_kib": 50000 + growth,
            "growth_kib": growth,
        }

    def status(alone_kib: int) -> dict:
        results = _results(1.4, 1.3)
        results["memory"] = {
            "C extension (ec, clear)": mem(runner.NATIVE, "ec", 9000),
            "C extension (rsa, enc)": mem(runner.NATIVE, "rsa", 3000),
            runner.SOFTHSM2_ALONE: mem(runner.PYKCS11, "ec", alone_kib),
        }
        return {name: st for name, st, _ in report.targets(results)}

    ec = "RSS growth < 2 MB over 20,000 cycles (C extension (ec, clear))"
    rsa = "RSS growth < 2 MB over 20,000 cycles (C extension (rsa, enc))"
    assert status(8500)[ec] == report.MET  # 0.5 MB ours
    assert status(1000)[ec] == report.NOT_MET  # 7.8 MB ours
    assert status(8500)[rsa] == report.NOT_MET  # an EC figure never discounts RSA
