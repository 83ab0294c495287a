"""Issue 12 item 10 on macOS: every PKCS#12 key derivation is capped at
2,000,000 iterations before SecPKCS12Import sees the file (the PKCS#11
backend's limit, same DecodeError).  Hostile files are built here in DER
(and BER); the Security.framework TEST DOUBLE (conftest.py: the one
acceptable double) logs whether the import was reached."""

from __future__ import annotations

import pytest

from keychain_ext import DecodeError

from .conftest import (
    DATA,
    PASSWORD,
    SAFE_CONTENTS_BAG,
    ber,
    calls,
    ctx0,
    data_content,
    encrypted_content,
    fake_text,
    integer,
    mac_data,
    octets,
    oid,
    pbes2,
    pfx,
    pkcs12_pbe,
    secret_bag,
    seq,
    shrouded_key_bag,
    store_empty,
    tlv,
)

LIMIT = 2_000_000
PAYLOAD = secret_bag(fake_text("alice"))


def imported() -> bool:
    return any(c.startswith("SecPKCS12Import") for c in calls())


def refused(kc, p12: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        kc.preauth_key(p12, PASSWORD, "alice")
    assert not imported(), "the file reached SecPKCS12Import"
    assert store_empty()


def test_the_limit_itself_is_accepted(kc):
    p12 = pfx(
        data_content(PAYLOAD, shrouded_key_bag(pbes2(LIMIT))),
        encrypted_content(pkcs12_pbe(LIMIT)),
        mac=mac_data(LIMIT),
    )
    assert kc.preauth_key(p12, PASSWORD, "alice").label == "alice"
    assert imported()
    kc.kill_key("alice")


def test_mac_iterations_capped(kc):
    refused(
        kc,
        pfx(data_content(PAYLOAD), mac=mac_data(LIMIT + 1)),
        "MAC asks for 2000001 key derivation iterations",
    )


def test_mac_without_iterations_is_one(kc):
    assert kc.preauth_key(pfx(data_content(PAYLOAD), mac=mac_data(None)), PASSWORD, "alice")
    kc.kill_key("alice")


@pytest.mark.parametrize("iterations", [LIMIT + 1, 3_000_000, 2**31, 2**64 + 5, 0])
def test_pbkdf2_key_bag_capped(kc, iterations):
    p12 = pfx(data_content(PAYLOAD, shrouded_key_bag(pbes2(iterations))))
    refused(kc, p12, "key bag asks for .*key derivation iterations")


def test_encrypted_part_capped_pbes2_and_legacy_pbe(kc):
    refused(kc, pfx(data_content(PAYLOAD), encrypted_content(pbes2(3_000_000))), "encrypted part")
    refused(
        kc, pfx(data_content(PAYLOAD), encrypted_content(pkcs12_pbe(3_000_000))), "encrypted part"
    )


def test_nested_safe_contents_bag_walked(kc):
    nested = seq(oid(SAFE_CONTENTS_BAG), ctx0(seq(shrouded_key_bag(pbes2(LIMIT + 1)))))
    refused(kc, pfx(data_content(PAYLOAD, nested)), "key bag")


def test_unknown_kdf_or_cipher_refused(kc):
    scrypt = "1.3.6.1.4.1.11591.4.11"
    refused(
        kc, pfx(data_content(PAYLOAD, shrouded_key_bag(pbes2(2048, kdf=scrypt)))), "does not know"
    )
    unknown = seq(oid("1.2.3.4"), seq(octets(b"s"), integer(1)))
    refused(kc, pfx(data_content(PAYLOAD, shrouded_key_bag(unknown))), "does not know")


def test_ber_indefinite_lengths_walked_too(kc):
    """BER (what some exporters write): indefinite lengths and a
    constructed OCTET STRING hide nothing from the walk."""
    bag = shrouded_key_bag(pbes2(LIMIT + 1))
    safe = ber(0x30, PAYLOAD, bag)
    chunked = ber(0x24, octets(safe[:10]), octets(safe[10:]))
    content = ber(0x30, oid(DATA), ber(0xA0, chunked))
    auth_safe = octets(ber(0x30, content))
    p12 = ber(0x30, integer(3), ber(0x30, oid(DATA), ber(0xA0, auth_safe)), mac_data())
    refused(kc, p12, "key bag")
    # the same file at the limit is accepted
    safe = ber(0x30, PAYLOAD, shrouded_key_bag(pbes2(LIMIT)))
    chunked = ber(0x24, octets(safe[:10]), octets(safe[10:]))
    content = ber(0x30, oid(DATA), ber(0xA0, chunked))
    p12 = ber(0x30, integer(3), ber(0x30, oid(DATA), ber(0xA0, octets(ber(0x30, content)))))
    assert kc.preauth_key(p12, PASSWORD, "alice")
    kc.kill_key("alice")


@pytest.mark.parametrize(
    "p12",
    [
        pfx(data_content(PAYLOAD)) + b"\0",  # trailing bytes
        seq(integer(2), seq(oid(DATA), ctx0(octets(seq(data_content(PAYLOAD)))))),  # version 2
        seq(integer(3), seq(oid("1.2.840.113549.1.7.2"), ctx0(seq()))),  # public-key integrity
        b"\x30\x80" + b"\x30\x80" * 200 + b"\0\0" * 200,  # deep nesting
        tlv(0x30, b"\x02\x01\x03\x30\x84\xff\xff\xff\xff"),  # length past the end
    ],
    ids=["trailing", "version-2", "signed-data", "deep-nesting", "huge-length"],
)
def test_malformed_pfx_refused(kc, p12):
    refused(kc, p12, "PKCS#12")
