"""Pure contract rules: script bytes, key derivation, signatures, settlement split, addresses."""

import hashlib
import hmac

import pytest
from bitcoin.wallet import CKey

from bitmesh.chain.address import AddressError, address_to_script, p2wpkh_script, script_to_address
from bitmesh.channel import contract as c
from bitmesh.channel.keys import _ckd_hardened
from bitmesh.errors import ChannelError

CLIENT = CKey(hashlib.sha256(b"client").digest())
SERVER = CKey(hashlib.sha256(b"server").digest())


def test_witness_script_is_the_protocol_bytes():
    contract = c.Contract(bytes(SERVER.pub), bytes(CLIENT.pub), 1500)
    expected = (
        b"\x63" + b"\x21" + bytes(SERVER.pub) + b"\xad"  # IF <server> CHECKSIGVERIFY
        + b"\x67" + b"\x02\xdc\x05" + b"\xb1\x75"  # ELSE <1500> CLTV DROP
        + b"\x68" + b"\x21" + bytes(CLIENT.pub) + b"\xac"  # ENDIF <client> CHECKSIG
    )
    assert contract.witness_script == expected
    assert contract.script_pubkey == b"\x00\x20" + hashlib.sha256(expected).digest()


def test_bip32_hardened_derivation_matches_test_vector_1():
    # BIP32 test vector 1: seed 000102...0f, chain m/0H
    digest = hmac.new(b"Bitcoin seed", bytes(range(16)), hashlib.sha512).digest()
    key, chain = int.from_bytes(digest[:32], "big"), digest[32:]
    child, child_chain = _ckd_hardened(key, chain, 0)
    assert child.to_bytes(32, "big").hex() == "edb2e14f9ee77d26dd93b4ecede8d16ed408ce149b6cd80b0715a2d911a0afea"
    assert child_chain.hex() == "47fdacbd0f1097043b78c63c20c34ef4ed9a111d980047ad16282c7ae6236141"


def test_der_parser_rejects_non_strict_encodings():
    sig = CLIENT.sign(hashlib.sha256(b"m").digest())
    r, s = c.parse_der_signature(sig)
    assert r > 0 and s > 0
    for bad in (sig[:-1], sig + b"\x00", b"\x31" + sig[1:], sig[:4] + b"\x00" + sig[4:]):
        with pytest.raises(ValueError):
            c.parse_der_signature(bad)


def test_high_s_signature_is_refused_even_though_it_verifies():
    digest = hashlib.sha256(b"m").digest()
    sig = CLIENT.sign(digest)
    r, s = c.parse_der_signature(sig)
    high_s = (0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 - s).to_bytes(33, "big").lstrip(b"\0")
    if high_s[0] & 0x80:
        high_s = b"\0" + high_s
    rb = r.to_bytes(33, "big").lstrip(b"\0")
    if rb[0] & 0x80:
        rb = b"\0" + rb
    body = b"\x02" + bytes([len(rb)]) + rb + b"\x02" + bytes([len(high_s)]) + high_s
    der = b"\x30" + bytes([len(body)]) + body
    assert CLIENT.pub.verify(digest, der)  # OpenSSL accepts it; relay policy does not
    with pytest.raises(c.ChannelError) as e:
        c.check_signature(bytes(CLIENT.pub), digest, der)
    assert e.value.code == "signature_high_s"


def test_sighash_type_switches_to_none_when_change_is_dust():
    assert c.payment_sighash_type(100_000, 99_454) == c.SIGHASH_PAYMENT  # change 546
    assert c.payment_sighash_type(100_000, 99_455) == c.SIGHASH_PAYMENT_ALL  # change 545
    assert c.payment_tx(c.Outpoint("11" * 32, 0), 100_000, 99_455, b"\x00\x14" + bytes(20)).vout == ()


@pytest.mark.parametrize(
    "paid, owed, feerate",
    [(50_000, 50_000, 2.0), (50_000, 30_000, 2.0), (50_000, 49_700, 2.0), (1_000, 700, 0.5), (100_000, 100_000, 1.0)],
)
def test_settlement_plan_conserves_the_deposit_and_never_touches_the_signed_change(paid, owed, feerate):
    refund, payout = p2wpkh_script(CLIENT.pub), p2wpkh_script(SERVER.pub)
    script = c.Contract(bytes(SERVER.pub), bytes(CLIENT.pub), 1500).witness_script
    plan = c.plan_settlement(100_000, paid, owed, feerate, refund, payout, script)
    expected_change = 100_000 - paid if 100_000 - paid >= c.DUST_LIMIT_SAT else 0
    assert plan.client_change == expected_change
    assert plan.client_change + plan.server_payout + plan.client_unused + plan.fee == 100_000
    # the fee is what the feerate asks, paid from the owner's share; unused credit is returned
    # in full, or (below dust) dropped into the fee: the client never pays more than 545 sat of it
    asked = c.fee_for(feerate, c.settlement_vsize(1, refund, payout, script))
    unused = paid - owed
    assert plan.server_payout == owed - asked >= c.DUST_LIMIT_SAT
    assert plan.client_unused == (unused if unused >= c.DUST_LIMIT_SAT else 0)
    assert plan.fee == asked + (unused - plan.client_unused)


def test_a_settlement_the_owners_share_cannot_pay_is_uneconomic_not_paid_by_the_client():
    """The old plan took the fee out of the client's unused credit when the owner's share fell short."""
    refund, payout = p2wpkh_script(CLIENT.pub), p2wpkh_script(SERVER.pub)
    script = c.Contract(bytes(SERVER.pub), bytes(CLIENT.pub), 1500).witness_script
    with pytest.raises(ChannelError) as refused:
        c.plan_settlement(100_000, 1_000, 100, 5.0, refund, payout, script)
    assert refused.value.code == "settlement_uneconomic"


def test_addresses_round_trip_on_every_network_and_refuse_foreign_ones():
    prog = bytes(range(20))
    for net, prefix in (("main", "bc1q"), ("test", "tb1q"), ("regtest", "bcrt1q"), ("regtest-bcoin", "rb1q")):
        addr = script_to_address(b"\x00\x14" + prog, net)
        assert addr.startswith(prefix)
        assert address_to_script(addr, net) == b"\x00\x14" + prog
    taproot = "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0"
    assert address_to_script(taproot, "main")[:2] == b"\x51\x20"
    with pytest.raises(AddressError):
        address_to_script("tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx", "main")
    with pytest.raises(AddressError):  # bech32 checksum on a v1 program (must be bech32m)
        address_to_script("bc1pw508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7k7grplx", "main")
