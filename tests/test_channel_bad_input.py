"""Bad input through the real portal: each refusal has its own code and changes nothing.

"Nothing" is checked twice: the channel as the portal shows it, and the journal's bytes.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable

import pytest
from bitcoin.core import CMutableTransaction, CScript, CTransaction, CTxOut
from bitcoin.core.script import SIGHASH_ALL

from bitmesh.chain.address import p2wpkh_script
from bitmesh.channel import contract as c
from bitmesh.channel.payer import Coin as PayerCoin
from bitmesh.channel.payer import build_funding
from bitmesh.paying import PayerSession
from tests.support.coins import new_key
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
    "dust_change": (lambda p: _signed(p, DEPOSIT - 500, _dust_change(p), c.SIGHASH_PAYMENT), "change_dust"),
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
