"""Bad input through the real portal: each refusal has its own code and changes nothing.

"Nothing" is checked twice: the channel as the portal shows it, and the journal's bytes.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator

import pytest
from bitcoin.core import CMutableTransaction, CScript, CTransaction, CTxOut
from bitcoin.core.script import SIGHASH_ALL
from bitcoin.wallet import CKey

from bitmesh.chain.address import p2wpkh_script
from bitmesh.chain.esplora import EsploraBackend
from bitmesh.chain.txutil import txid_of
from bitmesh.channel import contract as c
from bitmesh.channel.payer import Coin as PayerCoin
from bitmesh.channel.payer import build_funding
from bitmesh.paying import PayerSession
from bitmesh.portal.client import PortalError
from tests.support.coins import Coin, new_key, sign_p2wpkh_spend
from tests.support.esplora_server import EsploraTestServer
from tests.support.hotspot import Hotspot

pytestmark = pytest.mark.regtest

DEPOSIT = 100_000
PAID = 10_000


@pytest.fixture
def paying(hotspot: Hotspot) -> PayerSession:
    payer = hotspot.funded_payer(DEPOSIT)
    payer.pay_exact(PAID)
    return payer


def _post(hotspot: Hotspot, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", hotspot.http.port, timeout=10)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    status, data = resp.status, json.loads(resp.read())
    conn.close()
    return status, data


def _snapshot(hotspot: Hotspot, channel_id: str) -> tuple[dict, bytes]:
    journal = (hotspot.state_dir / "channels.journal").read_bytes()
    return hotspot.portal.channel(channel_id), journal


def _signed(payer: PayerSession, amount: int, mutate: Callable[[CMutableTransaction], None] | None = None,
            hashtype: int | None = None) -> dict:
    """A payment for `amount`, optionally with its transaction changed before signing, or
    signed with another sighash type: what a buggy or malicious wallet might send."""
    ch = payer.channel
    tx = CMutableTransaction.from_tx(c.payment_tx(ch.funding, ch.deposit, amount, ch.refund_script))
    if mutate:
        mutate(tx)
    kind = hashtype if hashtype is not None else c.payment_sighash_type(ch.deposit, amount)
    digest = c.contract_sighash(tx, ch.contract, ch.deposit, kind)
    sig = c.sign(ch.client_key, digest, kind)
    return {"amount": amount, "tx": CTransaction.from_tx(tx).serialize().hex(), "signature": sig.hex()}


def _tampered(payer: PayerSession, amount: int) -> dict:
    msg = payer.channel.payment_message(amount)
    sig = bytearray(bytes.fromhex(msg["signature"]))
    sig[10] ^= 0x01  # a bit of r
    return {**msg, "signature": sig.hex()}


def _change_to(script: bytes):
    def mutate(tx: CMutableTransaction) -> None:
        tx.vout[0] = CTxOut(tx.vout[0].nValue, CScript(script))
    return mutate


def _change_amount(delta: int):
    def mutate(tx: CMutableTransaction) -> None:
        tx.vout[0] = CTxOut(tx.vout[0].nValue + delta, tx.vout[0].scriptPubKey)
    return mutate


def _dust_change(payer: PayerSession):
    def mutate(tx: CMutableTransaction) -> None:
        tx.vout.append(CTxOut(500, CScript(payer.channel.refund_script)))
    return mutate


PAYMENT_CASES = {
    "tampered_signature": (lambda p: _tampered(p, 20_000), "signature_invalid"),
    "wrong_sighash_type": (lambda p: _signed(p, 20_000, hashtype=SIGHASH_ALL), "wrong_sighash"),
    "none_sighash_with_change": (lambda p: _signed(p, 20_000, hashtype=c.SIGHASH_PAYMENT_ALL), "wrong_sighash"),
    "decreasing_amount": (lambda p: _signed(p, PAID - 1_000), "payment_not_increasing"),
    "equal_amount": (lambda p: _signed(p, PAID), "payment_not_increasing"),
    "above_deposit": (lambda p: {**_signed(p, 20_000), "amount": DEPOSIT + 1}, "payment_exceeds_deposit"),
    "change_to_another_script": (
        lambda p: _signed(p, 20_000, _change_to(p2wpkh_script(new_key().pub))), "change_script_mismatch"),
    "change_of_another_amount": (lambda p: _signed(p, 20_000, _change_amount(+500)), "change_amount_mismatch"),
    "amount_field_lies_about_signed_change": (
        lambda p: {**_signed(p, 20_000), "amount": 21_000}, "change_amount_mismatch"),
    "dust_change": (lambda p: _signed(p, DEPOSIT - 500, _dust_change(p), c.SIGHASH_PAYMENT),
                    "payment_dust_change"),
    # the same amount signed "pay everything" without the output: the 500 sat would go to miners
    "dust_change_dropped_to_fee": (lambda p: _signed(p, DEPOSIT - 500, hashtype=c.SIGHASH_PAYMENT_ALL),
                                   "payment_dust_change"),
    "one_sat_change_dropped_to_fee": (lambda p: _signed(p, DEPOSIT - 1, hashtype=c.SIGHASH_PAYMENT_ALL),
                                      "payment_dust_change"),
    "other_input": (lambda p: _signed(p, 20_000, lambda tx: setattr(tx.vin[0], "nSequence", 0xFFFFFFFF)),
                    "payment_tx_invalid"),
    "signature_not_der": (lambda p: {**_signed(p, 20_000), "signature": "30" + "00" * 70 + "83"},
                          "signature_malformed"),
    "amount_not_an_integer": (lambda p: {**_signed(p, 20_000), "amount": "20000"}, "field_invalid"),
    "amount_boolean": (lambda p: {**_signed(p, 20_000), "amount": True}, "field_invalid"),
    "tx_garbage": (lambda p: {**_signed(p, 20_000), "tx": "deadbeef"}, "tx_malformed"),
    "missing_signature": (lambda p: {"amount": 20_000, "tx": _signed(p, 20_000)["tx"]}, "field_missing"),
}


@pytest.mark.parametrize("case", sorted(PAYMENT_CASES))
def test_bad_payment_is_refused_with_its_code_and_changes_nothing(hotspot: Hotspot, paying: PayerSession, case):
    make, code = PAYMENT_CASES[case]
    before = _snapshot(hotspot, paying.channel_id)
    status, answer = _post(hotspot, f"/api/channels/{paying.channel_id}/payments", json.dumps(make(paying)).encode())
    assert answer["error"]["code"] == code, answer
    assert 400 <= status < 500
    assert _snapshot(hotspot, paying.channel_id) == before
    # and the channel still works: the next honest payment goes through
    assert paying.pay_exact(PAID + 1_000)["paid"] == PAID + 1_000


@pytest.mark.parametrize(
    "body, code, status",
    [
        (b"{not json", "json_malformed", 400),
        (b"[1, 2]", "json_malformed", 400),
        (b"\xff\xfe", "json_malformed", 400),
        (b'{"amount": 1' + b" " * 70_000 + b"}", "body_too_large", 413),
    ],
)
def test_malformed_and_oversized_bodies(hotspot: Hotspot, paying: PayerSession, body, code, status):
    before = _snapshot(hotspot, paying.channel_id)
    got_status, answer = _post(hotspot, f"/api/channels/{paying.channel_id}/payments", body)
    assert (got_status, answer["error"]["code"]) == (status, code)
    assert _snapshot(hotspot, paying.channel_id) == before


def test_oversized_body_is_refused_from_its_header_before_it_is_read(hotspot: Hotspot, paying: PayerSession):
    conn = http.client.HTTPConnection("127.0.0.1", hotspot.http.port, timeout=10)
    conn.putrequest("POST", f"/api/channels/{paying.channel_id}/payments")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.endheaders()  # no body follows: the server must answer without waiting for 50 MB
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"


def test_unknown_channel(hotspot: Hotspot):
    status, answer = _post(hotspot, "/api/channels/" + "ab" * 16 + "/payments", b"{}")
    assert (status, answer["error"]["code"]) == (404, "channel_unknown")
    status, answer = _post(hotspot, "/api/channels/nope/close", b"{}")
    assert (status, answer["error"]["code"]) == (404, "channel_unknown")


def _funding_from(hotspot: Hotspot, payer: PayerSession, contract_script: bytes, amount: int) -> CTransaction:
    key = new_key()
    coin, _ = hotspot.faucet.pay(p2wpkh_script(key.pub), amount + 5_000)
    fake = c.Contract(payer.channel.contract.server_pubkey, payer.channel.contract.client_pubkey, 1)
    tx = build_funding([PayerCoin(c.Outpoint(coin.txid, coin.vout), coin.value, coin.script, key)], amount, fake,
                       p2wpkh_script(key.pub), 2.0)
    mutable = CMutableTransaction.from_tx(tx)
    mutable.vout[0] = CTxOut(amount, CScript(contract_script))
    # re-sign is not needed for the router's check: it refuses before broadcasting
    return CTransaction.from_tx(mutable)


@pytest.mark.parametrize("case, code", [("wrong_script", "funding_script_mismatch"),
                                        ("wrong_amount", "funding_amount_mismatch")])
def test_wrong_funding_is_refused_and_channel_keeps_waiting(hotspot: Hotspot, case, code):
    payer = hotspot.open_payer(50_000)
    right_script = payer.channel.contract.script_pubkey
    if case == "wrong_script":
        tx = _funding_from(hotspot, payer, p2wpkh_script(new_key().pub), 50_000)
        body = {"tx": tx.serialize().hex(), "vout": 0}
    else:
        tx = _funding_from(hotspot, payer, right_script, 49_999)
        body = {"tx": tx.serialize().hex()}
    before = _snapshot(hotspot, payer.channel_id)
    status, answer = _post(hotspot, f"/api/channels/{payer.channel_id}/funding", json.dumps(body).encode())
    assert (status, answer["error"]["code"]) == (400, code)
    assert _snapshot(hotspot, payer.channel_id) == before
    assert before[0]["state"] == "awaiting_funding"


# --- fundings the router must not use before they confirm (0-conf) ------------------------------

FINAL = 0xFFFFFFFF
RBF = 0xFFFFFFFD  # BIP125: any input below 0xfffffffe signals replaceability


def _own_coin(hotspot: Hotspot, value: int, confirm: bool = False) -> tuple[CKey, Coin]:
    key = new_key()
    coin, _ = hotspot.faucet.pay(p2wpkh_script(key.pub), value)
    if confirm:
        hotspot.mine(1)
    return key, coin


def _spend(key: CKey, coin: Coin, to: bytes, value: int, fee: int, sequence: int = FINAL) -> CTransaction:
    """`value` to `to` (output 0), the rest less `fee` back to `key` (output 1)."""
    return sign_p2wpkh_spend(key, [coin], [(to, value), (p2wpkh_script(key.pub), coin.value - value - fee)],
                             sequence=sequence)


def _submit(hotspot: Hotspot, payer: PayerSession, tx: CTransaction) -> tuple[int, dict]:
    body = json.dumps({"tx": tx.serialize().hex(), "vout": 0}).encode()
    return _post(hotspot, f"/api/channels/{payer.channel_id}/funding", body)


def _wait_then_open(hotspot: Hotspot, payer: PayerSession, funding: CTransaction) -> None:
    """The channel waits (no payment taken) until its funding confirms, then opens."""
    payer.channel.prepare_refund(c.Outpoint(txid_of(funding), 0), 2.0)
    with pytest.raises(PortalError) as refused:
        payer.pay_exact(1_000)
    assert refused.value.code == "channel_not_open"
    hotspot.mine(1)
    hotspot.manager.watch()
    assert hotspot.state(payer) == "open"
    assert payer.pay_exact(1_000)["paid"] == 1_000


def _parent_then_funding(hotspot: Hotspot, contract_script: bytes, parent_fee: int, parent_sequence: int,
                         funding_fee: int) -> tuple[CTransaction, CTransaction]:
    """An unconfirmed parent (its own input confirmed) and a funding spending it."""
    key, coin = _own_coin(hotspot, 60_000, confirm=True)
    parent = sign_p2wpkh_spend(key, [coin], [(p2wpkh_script(key.pub), coin.value - parent_fee)],
                               sequence=parent_sequence)
    hotspot.chain.broadcast(parent.serialize())
    mid = Coin(txid_of(parent), 0, coin.value - parent_fee, p2wpkh_script(key.pub))
    return parent, _spend(key, mid, contract_script, 50_000, funding_fee)


# Sizes: a 1-in 2-out funding is 153 vB, a 1-in 1-out parent 110 vB; regtest has no fee estimate,
# so 0-conf needs the fallback 2 sat/vB (bitmesh.chain.base.FALLBACK_FEERATE_SAT_VB).
FUNDING_CASES = {
    "timely_and_final": (lambda h, s: (None, _spend(*_own_coin(h, 60_000), s, 50_000, 2_000)), "open"),
    "signals_rbf": (lambda h, s: (None, _spend(*_own_coin(h, 60_000), s, 50_000, 2_000, RBF)), "funding_unconfirmed"),
    "low_feerate": (lambda h, s: (None, _spend(*_own_coin(h, 60_000), s, 50_000, 200)), "funding_unconfirmed"),
    # 350 sat is 2.3 sat/vB alone, but 1.8 with the parent it needs to be mined
    "low_fee_parent": (lambda h, s: _parent_then_funding(h, s, 130, FINAL, 350), "funding_unconfirmed"),
    "low_fee_parent_paid_for_by_the_funding": (lambda h, s: _parent_then_funding(h, s, 130, FINAL, 1_500), "open"),
    "rbf_parent": (lambda h, s: _parent_then_funding(h, s, 2_000, RBF, 2_000), "funding_unconfirmed"),
}


@pytest.mark.parametrize("case", sorted(FUNDING_CASES))
def test_zero_conf_only_for_a_timely_final_funding_with_its_unconfirmed_parents_judged(hotspot: Hotspot, case):
    make, state = FUNDING_CASES[case]
    payer = hotspot.open_payer(50_000)
    _, funding = make(hotspot, payer.channel.contract.script_pubkey)
    status, answer = _submit(hotspot, payer, funding)
    assert status == 200, answer
    assert answer["state"] == state and answer["funding"] == f"{txid_of(funding)}:0"
    assert answer["funding_confirmations"] == 0
    if state == "open":
        payer.channel.prepare_refund(c.Outpoint(txid_of(funding), 0), 2.0)
        assert payer.pay_exact(1_000)["paid"] == 1_000
    else:
        _wait_then_open(hotspot, payer, funding)


def test_zero_conf_total_cap_over_several_channels(bcoin, faucet, tmp_path):
    """Each deposit is under the per-channel cap; the third would take the unconfirmed total
    over zero_conf_total_max_sat and waits, until the first ones confirm."""
    rig = Hotspot.start(bcoin, faucet, tmp_path / "state", zero_conf_max_sat=100_000,
                        zero_conf_total_max_sat=150_000)
    try:
        first, second, third = (rig.funded_payer(60_000) for _ in range(3))
        assert [rig.state(p) for p in (first, second, third)] == ["open", "open", "funding_unconfirmed"]
        assert first.pay_exact(1_000)["paid"] == 1_000
        with pytest.raises(PortalError) as refused:
            third.pay_exact(1_000)
        assert refused.value.code == "channel_not_open"
        # a 30 000 sat deposit still fits beside the two (120 000 in use)
        small = rig.funded_payer(30_000)
        assert rig.state(small) == "open"
        rig.mine(1)
        rig.manager.watch()
        assert rig.state(third) == "open"
        assert third.pay_exact(1_000)["paid"] == 1_000
        # nothing unconfirmed is in use any more: the whole total is free again
        fourth, fifth = rig.funded_payer(100_000), rig.funded_payer(50_000)
        assert [rig.state(fourth), rig.state(fifth)] == ["open", "open"]
        assert rig.state(rig.funded_payer(20_000)) == "funding_unconfirmed"
    finally:
        rig.stop()


@pytest.fixture
def esplora_hotspot(bcoin, faucet, tmp_path) -> Iterator[tuple[Hotspot, EsploraTestServer]]:
    """A hotspot whose chain backend is Esplora (the test server over the node), which a test
    can make lie about a transaction's bytes."""
    with EsploraTestServer(bcoin) as server:
        rig = Hotspot.start(bcoin, faucet, tmp_path / "state")
        rig.manager.chain = rig.chain = EsploraBackend(server.url)
        try:
            yield rig, server
        finally:
            rig.stop()


def test_txid_funding_whose_backend_bytes_are_another_transaction_is_refused(esplora_hotspot):
    """The payer names a real transaction (txid:vout) that does not pay the contract; the
    backend answers, for that txid, crafted bytes that do. They do not hash to the txid."""
    hotspot, server = esplora_hotspot
    payer = hotspot.open_payer(50_000)
    script = payer.channel.contract.script_pubkey
    key, coin = _own_coin(hotspot, 60_000)  # coin.txid: a real transaction, output 0 is unspent
    crafted = _spend(key, coin, script, 50_000, 2_000)  # pays the contract, never broadcast
    server.tx_hex_override[coin.txid] = crafted.serialize().hex()
    before = _snapshot(hotspot, payer.channel_id)
    body = json.dumps({"txid": coin.txid, "vout": 0}).encode()
    status, answer = _post(hotspot, f"/api/channels/{payer.channel_id}/funding", body)
    assert (status, answer["error"]["code"]) == (502, "funding_txid_mismatch"), answer
    assert _snapshot(hotspot, payer.channel_id) == before and before[0]["state"] == "awaiting_funding"
    # garbage bytes are refused the same way
    server.tx_hex_override[coin.txid] = "00"
    status, answer = _post(hotspot, f"/api/channels/{payer.channel_id}/funding", body)
    assert (status, answer["error"]["code"]) == (502, "funding_txid_mismatch"), answer
    assert _snapshot(hotspot, payer.channel_id) == before
    # an honest backend: the real funding by txid is taken
    del server.tx_hex_override[coin.txid]
    funding = _spend(key, coin, script, 50_000, 2_000)
    hotspot.chain.broadcast(funding.serialize())
    status, answer = _post(hotspot, f"/api/channels/{payer.channel_id}/funding",
                           json.dumps({"txid": txid_of(funding), "vout": 0}).encode())
    assert (status, answer["state"]) == (200, "open"), answer
