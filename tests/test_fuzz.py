"""Fuzzing of the PKCS#12 parsing and import path (issue 6, item 4).

Runs tests/fuzz/run: builds tests/fuzz/fuzz_p12.c with clang, libFuzzer,
ASan and UBSan, seeds it with RSA/EC identities (make_client, make_variants:
`openssl pkcs12 -export` default and -legacy files, 1-iteration re-encodings,
files without key or certificate, truncations) and fuzzes kc_preauth_key /
kc_kill_key on a throwaway SoftHSM2 token for KEYCHAIN_EXT_FUZZ_SECONDS
(default 10: a smoke run that the harness still finds its way; the depth
comes from scripts/long-runs, summarized in LONG_RUNS.md).  Every input must end in success or a documented status with
nothing left on the token; any crash, sanitizer report or leak fails.

Needs clang and its libFuzzer runtime (Debian: clang, libclang-rt-dev).
In CI (env CI set) a missing tool fails; elsewhere the test skips, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .csources import CLANG_INSTALL, find_clang

RUN = Path(__file__).resolve().parent / "fuzz" / "run"
SECONDS = int(os.environ.get("KEYCHAIN_EXT_FUZZ_SECONDS", "10"))
# ~300 exec/s on one core with the 20,000-iteration seeds; keep a wide margin
MIN_EXECUTIONS = 20 * SECONDS


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (required in CI)")
    pytest.skip(what)


def _require_toolchain() -> None:
    clang = find_clang()
    if clang is None:
        _missing(f"clang not found: {CLANG_INSTALL}")
    probe = subprocess.run(
        [clang, "-fsanitize=fuzzer,address,undefined", "-x", "c", "-", "-o", os.devnull],
        input="#include <stddef.h>\n#include <stdint.h>\n"
        "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)"
        "{(void)d;(void)n;return 0;}\n",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        _missing(
            f"clang cannot link a libFuzzer target ({CLANG_INSTALL}): "
            + probe.stderr.strip()[-300:]
        )
    if shutil.which("pkg-config") is None:
        _missing("pkg-config not found")


def test_fuzz_p12_import() -> None:
    _require_toolchain()
    proc = subprocess.run(
        [sys.executable, str(RUN), "--seconds", str(SECONDS), "--quiet"],
        capture_output=True,
        text=True,
        timeout=SECONDS + 300,
    )
    out = proc.stdout.strip().splitlines()
    assert out, f"tests/fuzz/run printed nothing:\n{proc.stderr[-3000:]}"
    try:
        summary = json.loads(out[-1])
    except json.JSONDecodeError:
        pytest.fail(
            f"no summary from tests/fuzz/run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    report = f"{summary}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, report
    assert summary["exit_status"] == 0, report
    assert summary["artifacts"] == [], report
    assert summary["sanitizer_reports"] == 0, report
    assert summary["executions"] >= MIN_EXECUTIONS, report
