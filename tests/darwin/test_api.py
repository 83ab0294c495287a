"""keychain_ext's public API on the macOS backend, against the
Security.framework TEST DOUBLE (see conftest.py: the one acceptable double,
as no real Security.framework exists on Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from keychain_ext import (
    DarwinKeychain,
    DecodeError,
    DuplicateItemError,
    InvalidOwnerEditError,
    ItemNotFoundError,
    Keychain,
    KeychainError,
    NoSuchKeychainError,
    ParamError,
    Pkcs12VerifyFailureError,
)
from keychain_ext.errors import UnimplementedError

from .conftest import (
    INJECTED,
    KEY_ID,
    PASSWORD,
    calls,
    count,
    lib,
    owner_text,
    put_record,
    record,
    store_empty,
)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_keychain_is_the_darwin_backend(kc):
    assert kc.location == DarwinKeychain(None)
    assert (kc.module, kc.token) == ("", "")


def test_preauth_lookup_kill_round_trip(kc, make_p12):
    ident = kc.preauth_key(make_p12(), PASSWORD, "alice")
    assert (ident.label, ident.common_name, ident.key_id) == ("alice", "alice", KEY_ID)
    assert ident.key_type == "rsa" and ident.has_certificate and ident.has_private_key
    assert ident.store == DarwinKeychain(None)
    assert (count("c"), count("k"), count("g")) == (1, 1, 1)
    assert lib.dbl_interaction_at_import() == 0  # no prompt possible
    assert lib.dbl_interaction() == 1  # restored
    found = kc.lookup("alice")
    assert found is not None and found.key_id == KEY_ID
    kc.kill_key("alice")
    assert store_empty()
    assert kc.lookup("alice") is None


def test_interaction_flag_restored_to_its_previous_value(kc, make_p12):
    lib.dbl_set_interaction(0)
    kc.preauth_key(make_p12(), PASSWORD, "alice")
    assert lib.dbl_interaction() == 0
    kc.kill_key("alice")


def test_ec_key(kc, make_p12):
    ident = kc.preauth_key(make_p12(flags=lib.DBL_P12_EC), PASSWORD, "alice")
    assert ident.key_type == "ec"
    kc.kill_key("alice")


def test_kill_missing_is_typed(kc):
    with pytest.raises(ItemNotFoundError) as info:
        kc.kill_key("nobody")
    assert isinstance(info.value, LookupError)
    kc.kill_key("nobody", missing_ok=True)


def test_duplicate_label_refused_touching_nothing(kc, make_p12):
    kc.preauth_key(make_p12(), PASSWORD, "alice")
    lib.dbl_log_clear()
    with pytest.raises(DuplicateItemError) as info:
        kc.preauth_key(make_p12(key_id=b"\x02" * 20), PASSWORD, "alice")
    assert isinstance(info.value, FileExistsError)
    assert not any(
        c.startswith(("SecPKCS12Import", "SecItemAdd", "SecItemDelete")) for c in calls()
    )
    kc.kill_key("alice")


def test_foreign_identity_under_the_label_refused_and_never_killed(kc, make_p12):
    lib.dbl_put(b"alice", b"\x07" * 20, 20, 0, 1, 1)
    with pytest.raises(DuplicateItemError):
        kc.preauth_key(make_p12(), PASSWORD, "alice")
    info = kc.lookup("alice")
    assert info is not None and not info.ours and info.owner_alive is None
    with pytest.raises(InvalidOwnerEditError):
        kc.kill_key("alice")
    assert (count("c"), count("k")) == (1, 1)
    kc.kill_key("alice", force=True)
    assert store_empty()


def test_certificate_without_key_is_someone_elses(kc):
    lib.dbl_put(b"bob", b"\x05" * 20, 20, 0, 1, 0)
    info = kc.lookup("bob")
    assert info is not None and info.has_certificate and not info.has_private_key
    with pytest.raises(InvalidOwnerEditError):
        kc.kill_key("bob")
    kc.kill_key("bob", force=True)
    assert count("c") == 0


def test_wrong_password(kc, make_p12):
    with pytest.raises(Pkcs12VerifyFailureError) as info:
        kc.preauth_key(make_p12(password="right"), "wrong-pw-123", "alice")
    assert info.value.native_code == -25293  # macOS reports errSecAuthFailed
    assert "wrong-pw-123" not in str(info.value)
    assert store_empty()


@pytest.mark.parametrize(
    "data",
    [b"not a pkcs12 file", b"\x30\x03\x02\x01\x03", b"\x30\x82\xff\xff\x02"],
    ids=["text", "truncated-pfx", "overlong-length"],
)
def test_corrupt_p12(kc, data):
    lib.dbl_log_clear()
    with pytest.raises(DecodeError):
        kc.preauth_key(data, PASSWORD, "alice")
    assert not any(c.startswith("SecPKCS12Import") for c in calls())
    assert store_empty()


def test_p12_with_a_certificate_but_no_key(kc, make_p12):
    """macOS imports the certificate of such a file all the same: it is
    rolled back (its CN is the label nothing carried before)."""
    lib.dbl_log_clear()
    with pytest.raises(DecodeError, match="no private key"):
        kc.preauth_key(make_p12(flags=lib.DBL_P12_NO_KEY), PASSWORD, "alice")
    assert any(c.startswith("SecPKCS12Import") for c in calls())
    assert store_empty()


def test_label_must_be_the_certificate_cn(kc, make_p12):
    lib.dbl_log_clear()
    with pytest.raises(ParamError, match="CN 'carol'"):
        kc.preauth_key(make_p12(cn="carol"), PASSWORD, "alice")
    assert store_empty()
    # the rollback ran before user interaction was allowed again
    log = calls()
    restored = log.index("SecKeychainSetUserInteractionAllowed(1)")
    assert max(i for i, c in enumerate(log) if c.startswith("SecItemDelete")) < restored


@pytest.mark.parametrize(
    ("label", "error"),
    [("", ParamError), ("a\0b", ParamError), ("x" * 300, ParamError), (b"alice", TypeError)],
    ids=["empty", "nul", "too-long", "bytes"],
)
def test_bad_label_refused_before_the_keychain(kc, make_p12, label, error):
    p12 = make_p12()
    lib.dbl_log_clear()
    with pytest.raises(error):
        kc.preauth_key(p12, PASSWORD, label)
    assert calls() == []


def test_ephemeral_needs_pkcs11(kc, make_p12):
    with pytest.raises(UnimplementedError):
        kc.preauth_key(make_p12(), PASSWORD, "alice", ephemeral=True)
    assert store_empty()


def test_shared_identity_joined_with_the_same_file_only(kc, make_p12):
    """Workers of one service share an identity: a live worker (our parent
    here) owns it, this process joins with the same PKCS#12 file (nothing
    imported), leaves it to the other on kill; another file is refused."""
    p12 = make_p12()
    lib.dbl_put(b"alice", KEY_ID, 20, 0, 1, 1)
    put_record("alice", owner_text(os.getppid(), shared=True, key_id=KEY_ID, p12=p12))
    lib.dbl_log_clear()
    ident = kc.preauth_key(p12, PASSWORD, "alice", shared=True)
    assert not any(c.startswith("SecPKCS12Import") for c in calls())
    assert ident.shared and ident.mine and ident.owners == 2 and ident.key_id == KEY_ID
    assert kc.preauth_key(p12, PASSWORD, "alice", shared=True).owners == 2  # once
    with pytest.raises(DuplicateItemError):
        kc.preauth_key(make_p12(password="other"), "other", "alice", shared=True)
    kc.kill_key("alice")  # this process leaves; the other owner keeps it
    left = kc.lookup("alice")
    assert left is not None and left.owners == 1 and not left.mine
    assert (count("c"), count("k"), count("g")) == (1, 1, 1)
    with pytest.raises(InvalidOwnerEditError, match="is running"):
        kc.kill_key("alice")
    kc.kill_key("alice", force=True)
    assert store_empty()


def test_shared_identity_made_here_goes_with_its_last_owner(kc, make_p12):
    ident = kc.preauth_key(make_p12(), PASSWORD, "alice", shared=True)
    assert ident.shared and ident.owners == 1 and "shared=1" in (record("alice") or "")
    kc.kill_key("alice")
    assert store_empty()


def test_preauthorized_removes_also_when_the_body_raises(kc, make_p12):
    with kc.preauthorized(make_p12(), PASSWORD, "alice") as ident:
        assert ident.mine and count("c") == 1
    assert store_empty()
    with pytest.raises(RuntimeError), kc.preauthorized(make_p12(), PASSWORD, "alice"):
        raise RuntimeError("body failed")
    assert store_empty()


def test_items_lists_keychain_ext_identities_only(kc, make_p12):
    lib.dbl_put(b"users-own", b"\x09" * 20, 20, 0, 1, 1)
    kc.preauth_key(make_p12(), PASSWORD, "alice")
    kc.preauth_key(make_p12(cn="bob", key_id=b"\x0b" * 20), PASSWORD, "bob", held=True)
    items = {i.label: i for i in kc.items()}
    assert set(items) == {"alice", "bob"}
    assert items["alice"].mine and items["alice"].owner_pid == os.getpid()
    assert items["alice"].owner_alive is True
    assert items["bob"].held and items["bob"].owners == 0 and not items["bob"].mine
    kc.kill_key("alice")
    kc.kill_key("bob")
    kc.kill_key("users-own", force=True)


def test_held_identity_survives_its_process_and_anyone_kills_it(kc, make_p12):
    kc.preauth_key(make_p12(), PASSWORD, "alice", held=True)
    assert "held=1" in (record("alice") or "")
    with Keychain() as other:
        other.kill_key("alice")
    assert store_empty()


def test_live_owner_refused_dead_owner_reclaimed(kc, make_p12):
    lib.dbl_put(b"alice", KEY_ID, 20, 0, 1, 1)
    put_record("alice", owner_text(os.getppid(), key_id=KEY_ID))
    with pytest.raises(InvalidOwnerEditError, match="is running"):
        kc.kill_key("alice")
    with pytest.raises(DuplicateItemError):
        kc.preauth_key(make_p12(), PASSWORD, "alice", stale="reclaim")
    assert kc.purge() == []
    kc.kill_key("alice", force=True)

    pid = dead_pid()
    lib.dbl_put(b"alice", KEY_ID, 20, 0, 1, 1)
    put_record("alice", owner_text(pid, key_id=KEY_ID))
    with pytest.raises(DuplicateItemError, match=f"pid {pid} died"):
        kc.preauth_key(make_p12(), PASSWORD, "alice")
    ident = kc.preauth_key(make_p12(), PASSWORD, "alice", stale="reclaim")
    assert ident.mine and f"owners={os.getpid()}@" in (record("alice") or "")
    kc.kill_key("alice")
    assert store_empty()


def test_purge_removes_dead_owners_identities_only(kc, make_p12):
    pid = dead_pid()
    lib.dbl_put(b"dead", KEY_ID, 20, 0, 1, 1)
    put_record("dead", owner_text(pid, key_id=KEY_ID))
    put_record("crashed", owner_text(pid))
    kc.preauth_key(make_p12(cn="live", key_id=b"\x0c" * 20), PASSWORD, "live")
    stale = {i.label for i in kc.purge()}
    assert stale == {"dead", "crashed"}
    assert {i.label for i in kc.purge(dry_run=False)} == stale
    assert (count("c"), count("k"), count("g")) == (1, 1, 1)
    kc.kill_key("live")


def test_identity_replaced_behind_our_back_is_left_alone(kc, make_p12):
    kc.preauth_key(make_p12(), PASSWORD, "alice")
    kc.kill_key("alice")  # gone, then someone else's identity takes the name
    lib.dbl_put(b"alice", b"\x0f" * 20, 20, 0, 1, 1)
    put_record("alice", owner_text(held=True, key_id=KEY_ID))
    with pytest.raises(InvalidOwnerEditError, match="not the one"):
        kc.kill_key("alice")
    assert (count("c"), count("k")) == (1, 1)
    kc.kill_key("alice", force=True)
    assert store_empty()


def test_keychain_file_searched_only_for_that_handle(make_p12, tmp_path):
    path = str(tmp_path / "ci.keychain-db")
    with pytest.raises(NoSuchKeychainError):
        Keychain(token=path)  # never created
    index = lib.dbl_add_keychain(path.encode())
    with Keychain(token=path) as kc:
        assert kc.location == DarwinKeychain(path)
        ident = kc.preauth_key(make_p12(), PASSWORD, "alice")
        assert ident.store == DarwinKeychain(path)
        assert (count("c", index), count("k", index), count("g", index)) == (1, 1, 1)
        assert count("c", 0) == 0
        kc.kill_key("alice")
    assert store_empty()


def test_module_or_pin_refused_on_macos():
    with pytest.raises(ParamError):
        Keychain(module="/usr/lib/softhsm/libsofthsm2.so")
    with pytest.raises(ParamError):
        Keychain(pin="1234")


def test_closed_keychain_refuses(make_p12):
    kc = Keychain()
    kc.close()
    kc.close()
    with pytest.raises(ParamError):
        kc.lookup("alice")


def test_threads_share_one_keychain(kc, make_p12):
    errors: list[BaseException] = []

    def work(n: int) -> None:
        label = f"t{n}"
        try:
            for _ in range(5):
                kc.preauth_key(make_p12(cn=label, key_id=bytes([n]) * 20), PASSWORD, label)
                kc.kill_key(label)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store_empty()


def test_every_preauth_call_failing_leaves_the_keychain_as_it_was(kc, make_p12):
    p12 = make_p12()
    lib.dbl_log_clear()
    kc.preauth_key(p12, PASSWORD, "alice")
    total = lib.dbl_calls()
    kc.kill_key("alice")
    failed = 0
    for pos in range(1, total + 1):
        lib.dbl_log_clear()
        lib.dbl_fail_call(pos, INJECTED)
        try:
            kc.preauth_key(p12, PASSWORD, "alice")
        except KeychainError as exc:
            failed += 1
            assert exc.status != 0
            assert lib.dbl_fired()
            assert store_empty(), f"call {pos} ({calls()[pos - 1]}) left items"
        else:
            lib.dbl_fail_call(0, 0)
            kc.kill_key("alice")
        if calls()[pos - 1] == "SecKeychainSetUserInteractionAllowed(1)":
            lib.dbl_set_interaction(1)  # the restore itself failed: reported
        assert lib.dbl_interaction() == 1
        lib.dbl_fail_call(0, 0)
    assert failed > total // 2


def test_rollback_failing_keeps_the_record_so_kill_finishes(kc, make_p12):
    """The import succeeds but the label is not the CN: the rollback runs;
    each of its calls is failed in turn.  What a failed rollback leaves is
    still proven keychain_ext's (its record stays) and kill removes it."""
    p12 = make_p12(cn="carol")
    lib.dbl_log_clear()
    with pytest.raises(ParamError):
        kc.preauth_key(p12, PASSWORD, "carol-x")
    log = calls()
    start = next(i for i, c in enumerate(log) if c.startswith("SecCertificateCopyCommonName"))
    rollback = range(start + 2, len(log) + 1)
    assert any(log[p - 1].startswith("SecItemDelete") for p in rollback)
    for pos in rollback:
        lib.dbl_log_clear()
        lib.dbl_fail_call(pos, INJECTED)
        with pytest.raises(ParamError):  # the original error, not the rollback's
            kc.preauth_key(p12, PASSWORD, "carol-x")
        assert lib.dbl_fired()
        lib.dbl_fail_call(0, 0)
        if count("c") or count("k"):
            # the claim stays, with the key id: nobody else takes the label
            # over leftovers, and kill removes the key by that id
            assert KEY_ID.hex() in (record("carol-x") or ""), f"rollback call {pos}"
        kc.kill_key("carol-x", missing_ok=True)
        kc.kill_key("carol", missing_ok=True, force=True)  # a lone certificate
        assert store_empty()


def test_every_kill_call_failing_is_reported_and_a_retry_finishes(kc, make_p12):
    p12 = make_p12()
    kc.preauth_key(p12, PASSWORD, "alice")
    lib.dbl_log_clear()
    kc.kill_key("alice")
    total = lib.dbl_calls()
    for pos in range(1, total + 1):
        kc.preauth_key(p12, PASSWORD, "alice")
        lib.dbl_log_clear()
        lib.dbl_fail_call(pos, INJECTED)
        try:
            kc.kill_key("alice")
        except KeychainError:
            lib.dbl_fail_call(0, 0)
            if calls()[pos - 1] == "SecKeychainSetUserInteractionAllowed(1)":
                lib.dbl_set_interaction(1)  # only the restore failed: reported
            else:
                assert count("g") == 1  # the record goes last
                kc.kill_key("alice")
        assert lib.dbl_interaction() == 1
        lib.dbl_fail_call(0, 0)
        assert store_empty(), f"kill call {pos} left items"


def test_the_leak_check_can_fail(tmp_path):
    """What the dbl fixture asserts after every test: an open handle holds
    CF references (its keychain and search list), closing releases them."""
    path = str(tmp_path / "k.keychain-db")
    lib.dbl_add_keychain(path.encode())
    kc = Keychain(token=path)
    assert lib.dbl_outstanding() > 0
    kc.close()
    assert lib.dbl_outstanding() == 0


def test_a_live_claim_is_respected_a_dead_one_replaced(kc, make_p12):
    """A record with nothing under it is another process's import under way
    (refused), or what a crash left (replaced without asking)."""
    put_record("alice", owner_text(os.getppid()))
    with pytest.raises(DuplicateItemError):
        kc.preauth_key(make_p12(), PASSWORD, "alice")
    assert count("c") == 0 and count("g") == 1
    kc.kill_key("alice", force=True)
    put_record("alice", owner_text(dead_pid()))
    ident = kc.preauth_key(make_p12(), PASSWORD, "alice")
    assert ident.mine and count("g") == 1
    kc.kill_key("alice")
    assert store_empty()


def test_owner_records_change_under_the_store_lock(kc, make_p12):
    """Another process holding the store lock (a flock on the lock file in
    the keychain's state directory) holds preauth back: owner records are
    read, changed and written under it, so workers joining a shared
    identity at the same instant cannot lose each other's entries."""
    import fcntl

    assert kc.lock_path and oct(os.stat(kc.lock_path).st_mode & 0o777) == "0o600"
    other = os.open(kc.lock_path, os.O_RDWR)  # another open file: another holder
    fcntl.flock(other, fcntl.LOCK_EX)
    lib.dbl_log_clear()
    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (kc.preauth_key(make_p12(), PASSWORD, "alice"), done.set())
    )
    worker.start()
    try:
        assert not done.wait(0.5), "preauth went on while another process held the lock"
        assert count("g") == 0 and count("c") == 0
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    worker.join()
    assert done.is_set() and count("g") == 1
    kc.kill_key("alice")
