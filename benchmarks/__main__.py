"""python -m benchmarks [--quick] [--json FILE]

Run from the repository root with the project's virtualenv
(``.venv/bin/python -m benchmarks``, or ``make bench``).  Needs the bench
extra (``pip install -e '.[bench]'``: python-pkcs11, PyKCS11, matplotlib),
SoftHSM2, a C compiler, libssl-dev and libp11-kit-dev.

The full run rewrites benchmarks/RESULTS.md and benchmarks/results.png;
--quick (under a minute) prints the same table from fewer repetitions and
writes nothing unless asked with --write.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (< 60 s)")
    ap.add_argument(
        "--write", action="store_true", help="write RESULTS.md and results.png also after --quick"
    )
    ap.add_argument("--json", type=Path, help="also write the raw results as JSON")
    # the runner's child processes: the wheel column, the processes row
    ap.add_argument("--wheel-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--process-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.wheel_child or args.process_child:
        from .runner import process_child, wheel_child

        (wheel_child if args.wheel_child else process_child)()
        return 0

    # SOFTHSM2_CONF must be set before anything loads SoftHSM2: the runner
    # sets it before it imports keychain_ext's extension.
    from . import report
    from .runner import Config, run_standalone

    config = Config.quick() if args.quick else Config()
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    log("benchmark " + ("(quick)" if args.quick else "(full)"))
    results = run_standalone(config, log=log)
    print(report.table(results))
    print()
    print("Targets:")
    print(report.targets_text(results))
    for name, reason in results["impls"].items():
        if reason:
            print(f"{name}: {reason}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    problems = report.validate(results)
    if problems:
        log("impossible figures, RESULTS.md not written: " + "; ".join(problems))
        return 1
    if not args.quick or args.write:
        (HERE / "RESULTS.md").write_text(report.markdown(results, args.quick))
        if report.chart(results, HERE / "results.png"):
            log("wrote benchmarks/RESULTS.md and benchmarks/results.png")
        else:
            log(
                "wrote benchmarks/RESULTS.md; no chart: matplotlib is not installed "
                "(pip install -e '.[bench]')"
            )
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
