"""Logic tests of csrc/keychain_darwin.c that run on Linux.

The backend is compiled with gcc against tests/darwin_double/, a test double
of the Security/CoreFoundation subset it uses (an in-memory item store that
counts every CF retain/release, logs the calls, records the user-interaction
flag and fails any call on demand).  tests/darwin_double/driver.c holds the
scenarios; each prints "PASS <name> (<n> checks)".  This verifies the
backend's logic, ownership and error paths -- not Apple's framework: see
scripts/check-darwin (compiles and links against a real SDK) and
tests/macos/ (runs on a Mac) for those.

Nothing here is skipped: a missing gcc, valgrind or sanitizer runtime fails.
"""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOUBLE = os.path.join(ROOT, "tests", "darwin_double")
SOURCES = [
    os.path.join(ROOT, "csrc", "keychain_darwin.c"),
    os.path.join(ROOT, "csrc", "p12_walk.c"),
    os.path.join(DOUBLE, "double.c"),
    os.path.join(DOUBLE, "driver.c"),
]
CFLAGS = [
    "-std=c99",
    "-D_GNU_SOURCE",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-g",
    '-DKC_VERSION="9.8.7-test"',
    "-I",
    os.path.join(DOUBLE, "include"),
    "-I",
    DOUBLE,
    "-I",
    os.path.join(ROOT, "csrc"),
]

SCENARIOS = [
    "roundtrip",  # preauth -> lookup -> kill, flag restored
    "duplicate",  # refused with errSecDuplicateItem, nothing touched
    "kill_separately",  # certificate, then key by the recorded id
    "missing_key_id",  # no kSecImportItemKeyID: no crash, key's own id
    "bad_imports",  # zero items, CN mismatch, wrong password, ...
    "walk_preauth",  # every call of preauth failed in turn
    "walk_kill",  # every call of kill failed in turn
    "walk_lookup_open",  # every call of lookup and open failed in turn
    "scoped_keychain",  # opts->token opens (never creates) and scopes
    "misc_api",  # backend/version strings, unimplemented calls
    "threads",  # one handle shared by four threads
    "walk_mutations",  # the PKCS#12 walk: every truncation, byte changes
    "selftest_leak_detected",
]


def _gcc():
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    if gcc is None:
        pytest.fail("gcc is required to build the Darwin logic tests")
    return gcc


def _build(tmp_path_factory, name, extra=()):
    out = str(tmp_path_factory.mktemp("darwin-logic") / name)
    cmd = [_gcc(), *CFLAGS, *extra, *SOURCES, "-pthread", "-o", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, "build failed:\n" + proc.stderr
    # -Werror: the backend and the double compile without a warning
    assert "warning" not in proc.stderr, proc.stderr
    return out


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    return _build(tmp_path_factory, "driver", ["-O1"])


def _run(cmd, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _assert_passed(proc, names):
    assert proc.returncode == 0, "rc=%d\nstdout:\n%s\nstderr:\n%s" % (
        proc.returncode,
        proc.stdout,
        proc.stderr,
    )
    for name in names:
        m = re.search(r"^PASS %s \((\d+) checks\)$" % re.escape(name), proc.stdout, re.M)
        assert m, "%s did not report PASS:\n%s" % (name, proc.stdout)
        assert int(m.group(1)) > 0, "%s ran no checks" % name


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(driver, scenario):
    _assert_passed(_run([driver, scenario]), [scenario])


def test_overrelease_is_caught(driver):
    """The double aborts on a second CFRelease: the checks can fail."""
    proc = _run([driver, "selftest_overrelease"])
    assert proc.returncode != 0
    assert "used after its last release" in proc.stderr


def test_unknown_scenario_fails(driver):
    proc = _run([driver, "no_such_scenario"])
    assert proc.returncode == 2


def test_no_leak_under_valgrind(driver):
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.fail("valgrind is required (apt install valgrind)")
    proc = _run(
        [
            valgrind,
            "-q",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect,possible",
            "--show-leak-kinds=definite,indirect,possible",
            "--error-exitcode=99",
            driver,
            "all",
        ]
    )
    _assert_passed(proc, SCENARIOS)


def test_no_leak_or_memory_error_under_asan(tmp_path_factory):
    exe = _build(
        tmp_path_factory,
        "driver-asan",
        [
            "-O1",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer",
        ],
    )
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0")
    _assert_passed(_run([exe, "all"], env=env), SCENARIOS)


def test_threads_race_free_under_tsan(tmp_path_factory):
    """The double keeps global state without locks, so any call the
    backend fails to serialize shows up as a data race."""
    exe = _build(tmp_path_factory, "driver-tsan", ["-O1", "-fsanitize=thread"])
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1:exitcode=66")
    proc = _run([exe, "threads"], env=env)
    if "unexpected memory mapping" in proc.stderr:
        # Kernels with high mmap randomization: the usual workaround.
        setarch = shutil.which("setarch")
        assert setarch, "TSan needs setarch -R on this kernel:\n" + proc.stderr
        proc = _run([setarch, platform.machine(), "-R", exe, "threads"], env=env)
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr
    _assert_passed(proc, ["threads"])


def test_check_darwin_skips_without_sdk():
    env = {k: v for k, v in os.environ.items() if k != "MACOS_SDK"}
    proc = _run(["bash", os.path.join(ROOT, "scripts", "check-darwin")], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout


def test_double_says_it_is_a_double():
    for rel in (
        "include/Security/Security.h",
        "include/CoreFoundation/CoreFoundation.h",
        "double_control.h",
        "double.c",
    ):
        with open(os.path.join(DOUBLE, rel)) as f:
            assert "TEST DOUBLE" in f.read(2000), rel


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
