"""Logic tests of csrc/keychain_darwin.c (and its darwin_*.c units) that run on Linux.

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

from .csources import CLANG_INSTALL, find_clang

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOUBLE = os.path.join(ROOT, "tests", "darwin_double")
SOURCES = [
    os.path.join(ROOT, "csrc", "keychain_darwin.c"),
    os.path.join(ROOT, "csrc", "darwin_handle.c"),
    os.path.join(ROOT, "csrc", "darwin_record.c"),
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
    cmd = [_gcc(), *CFLAGS, *extra, *SOURCES, "-pthread", "-lcrypto", "-o", out]
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
    # libcrypto is not built with TSan: what it synchronizes with atomics TSan
    # cannot see (OpenSSL 3.5's lock-free method store, under concurrent
    # digests) shows up as races inside its own memcmp/memcpy; ours are
    # instrumented and still reported.
    suppressions = tmp_path_factory.mktemp("tsan") / "suppressions"
    suppressions.write_text("called_from_lib:libcrypto.so\n")
    env = dict(
        os.environ, TSAN_OPTIONS=f"halt_on_error=1:exitcode=66:suppressions={suppressions}"
    )
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


def test_p12_walk_fuzz_smoke(tmp_path):
    """csrc/p12_walk.c under libFuzzer, ASan and UBSan for a few seconds,
    seeded with real PKCS#12 files (PBES2/AES and legacy 3DES, as
    cryptography writes them).  Outside CI a missing libFuzzer skips."""
    clang = find_clang()
    exe = str(tmp_path / "fuzz_p12_walk")
    cmd = [
        clang or "clang",
        "-g",
        "-O1",
        "-fsanitize=fuzzer,address,undefined",
        "-fno-sanitize-recover=undefined",
        "-I",
        os.path.join(ROOT, "csrc"),
        os.path.join(ROOT, "csrc", "p12_walk.c"),
        os.path.join(ROOT, "tests", "fuzz", "fuzz_p12_walk.c"),
        "-o",
        exe,
    ]
    build = subprocess.run(cmd, capture_output=True, text=True) if clang else None
    if build is None or build.returncode != 0:
        why = f"clang with libFuzzer is required ({CLANG_INSTALL}): " + (
            build.stderr[-300:] if build else "no clang"
        )
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)

    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, pbes in enumerate(
        [pkcs12.PBES.PBESv2SHA256AndAES256CBC, pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC]
    ):
        enc = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(1)
            .key_cert_algorithm(pbes)
            .build(b"pw")
        )
        (corpus / f"seed{i}").write_bytes(
            pkcs12.serialize_key_and_certificates(b"fuzz", key, cert, None, enc)
        )
    proc = _run([exe, "-max_total_time=5", "-max_len=4096", str(corpus)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR:" not in proc.stderr, proc.stderr[-3000:]
    done = re.search(r"Done (\d+) runs", proc.stderr)
    assert done and int(done.group(1)) > 1000, proc.stderr[-1000:]


def test_p12_walk_accepts_real_files_and_caps_iterations(tmp_path):
    """The walk reads what real producers write -- OpenSSL (default,
    -legacy, -nomac, unencrypted) and NSS pk12util (BER: indefinite
    lengths, constructed OCTET STRINGs, 600,000 iterations) -- and refuses
    2,000,001 iterations with errSecDecode."""
    exe = str(tmp_path / "walk_files")
    build = subprocess.run(
        [_gcc(), "-Wall", "-Wextra", "-Werror", "-I", os.path.join(ROOT, "csrc"),
         os.path.join(ROOT, "csrc", "p12_walk.c"), os.path.join(DOUBLE, "walk_files.c"),
         "-o", exe],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr

    def sh(*cmd):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, (cmd, proc.stderr)

    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem",
       "-out", "c.pem", "-subj", "/CN=alice", "-days", "1")  # fmt: skip
    export = ["openssl", "pkcs12", "-export", "-in", "c.pem", "-inkey", "k.pem",
              "-passout", "pass:pw", "-name", "alice"]  # fmt: skip
    good = {
        "default.p12": [],
        "legacy.p12": ["-legacy"],
        "nomac.p12": ["-nomac"],
        "plain.p12": ["-keypbe", "NONE", "-certpbe", "NONE"],
    }
    for name, extra in good.items():
        sh(*export, *extra, "-out", name)
    sh(*export, "-iter", "2000001", "-out", "hostile.p12")
    if shutil.which("pk12util") and shutil.which("certutil"):
        os.mkdir(tmp_path / "nssdb")
        sh("certutil", "-N", "-d", "sql:nssdb", "--empty-password")
        sh("pk12util", "-i", "default.p12", "-d", "sql:nssdb", "-W", "pw")
        sh("pk12util", "-o", "nss.p12", "-n", "alice", "-d", "sql:nssdb", "-W", "pw")
        assert (tmp_path / "nss.p12").read_bytes()[:2] == b"\x30\x80"  # BER
        good["nss.p12"] = []
    elif os.environ.get("CI"):
        pytest.fail("NSS tools (pk12util, certutil) are required in CI")
    proc = _run([exe, *(str(tmp_path / n) for n in [*good, "hostile.p12"])])
    assert proc.returncode == 0, proc.stderr
    verdict = {line.split(" ", 2)[1].rsplit("/", 1)[1]: line for line in proc.stdout.splitlines()}
    for name in good:
        assert verdict[name].startswith("0 "), verdict[name]
    assert verdict["hostile.p12"].startswith("-26275 "), verdict["hostile.p12"]
    assert "2000001 key derivation iterations" in verdict["hostile.p12"]
