"""Writes tests/js/vectors/channel.json: what the Python reference (bitmesh.channel.contract and
bitmesh.channel.payer) builds from fixed keys, for the browser wallet's tests to match byte for byte.

    .venv/bin/python -m tests.js.make_vectors            # rewrite the file (from the repo root)
    .venv/bin/python -m tests.js.make_vectors --stdout   # print instead

python-bitcoinlib signs through OpenSSL with a random nonce (not RFC6979), so its signatures
differ on every run: the vectors carry them for the JS side to *verify*; everything else
(scripts, transactions, digests, txids, addresses, amounts) is deterministic and must be equal.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from bitcoin.core import CTransaction
from bitcoin.core.script import SIGHASH_ALL
from bitcoin.wallet import CKey

from bitmesh.chain.address import (
    NETWORKS,
    AddressError,
    address_to_script,
    p2pkh_script,
    p2wpkh_script,
    script_to_address,
)
from bitmesh.chain.txutil import txid_of
from bitmesh.channel import contract as c
from bitmesh.channel.payer import MeterBounds, PayerChannel, PayerLimits, check_meter, check_terms, unmetered_owed
from bitmesh.channel.wire import _btc
from bitmesh.errors import ChannelError
from bitmesh.tariff import Tariff
from tests.support.coins import Coin, sign_p2pkh_spend, sign_p2wpkh_spend

OUT = Path(__file__).with_name("vectors") / "channel.json"
NETWORK = "regtest-bcoin"
FEERATE = 2.0  # the reference payer's (bitmesh.paying.PayerSession.feerate_sat_vb)


def key(label: str) -> CKey:
    return CKey(hashlib.sha256(label.encode()).digest(), compressed=True)


CLIENT, SERVER, REFUND, FUNDER = key("bitmesh client"), key("bitmesh server"), key("bitmesh refund"), key("funder")
# Heights around every script-number encoding boundary, and one unix time.
EXPIRIES = [1, 16, 17, 127, 128, 200, 255, 256, 1544, 32767, 32768, 8388607, 8388608, 499999999, 1700000000]


def contracts() -> list[dict]:
    out = []
    for expiry in EXPIRIES:
        k = c.Contract(bytes(SERVER.pub), bytes(CLIENT.pub), expiry)
        out.append({
            "expiry": expiry,
            "witness_script": k.witness_script.hex(),
            "funding_script": k.script_pubkey.hex(),
            "funding_address": {net: script_to_address(k.script_pubkey, net) for net in NETWORKS},
        })
    return out


def fundings(contract: c.Contract, deposit: int) -> list[dict]:
    """A segwit funding (vout 1, witness serialization) and a legacy one (vout 0)."""
    fake_prev = Coin(hashlib.sha256(b"prev").hexdigest(), 3, deposit + 50_000, p2wpkh_script(FUNDER.pub))
    segwit = sign_p2wpkh_spend(FUNDER, [fake_prev], [(p2wpkh_script(FUNDER.pub), 40_000),
                                                      (contract.script_pubkey, deposit)])
    legacy_prev = Coin(hashlib.sha256(b"prev2").hexdigest(), 0, deposit + 9_000, p2pkh_script(FUNDER.pub))
    legacy = sign_p2pkh_spend(FUNDER, [legacy_prev], [(contract.script_pubkey, deposit),
                                                       (p2pkh_script(FUNDER.pub), 7_000)])
    wrong_amount = sign_p2wpkh_spend(FUNDER, [fake_prev], [(contract.script_pubkey, deposit - 1)])
    return [
        {"hex": segwit.serialize().hex(), "txid": txid_of(segwit), "vout": 1, "ok": True},
        {"hex": legacy.serialize().hex(), "txid": txid_of(legacy), "vout": 0, "ok": True},
        {"hex": wrong_amount.serialize().hex(), "txid": txid_of(wrong_amount), "vout": None, "ok": False,
         "code": "funding_amount_mismatch"},
    ]


def channel_vectors() -> dict:
    deposit, expiry, tip = 200_000, 1544, 1504
    contract = c.Contract(bytes(SERVER.pub), bytes(CLIENT.pub), expiry)
    refund_script = p2wpkh_script(REFUND.pub)
    refund_address = script_to_address(refund_script, NETWORK)
    terms = {
        "channel_id": "00" * 16, "state": "awaiting_funding", "server_pubkey": bytes(SERVER.pub).hex(),
        "client_pubkey": bytes(CLIENT.pub).hex(), "deposit": deposit, "expiry": expiry,
        "witness_script": contract.witness_script.hex(),
        "funding_address": script_to_address(contract.script_pubkey, NETWORK),
        "funding_script": contract.script_pubkey.hex(),
        "bip21": f"bitcoin:{script_to_address(contract.script_pubkey, NETWORK)}?amount={_btc(deposit)}",
        "refund_script": refund_script.hex(),
    }
    assert check_terms(terms, bytes(CLIENT.pub), deposit, refund_script, tip, PayerLimits()) == contract
    funds = fundings(contract, deposit)
    funding = c.Outpoint(funds[0]["txid"], funds[0]["vout"])

    payer = PayerChannel(contract, CLIENT, deposit, refund_script)
    refund = payer.prepare_refund(funding, FEERATE)
    unsigned_refund = CTransaction(refund.vin, refund.vout, refund.nLockTime, refund.nVersion)
    refund_digest = c.contract_sighash(unsigned_refund, contract, deposit, SIGHASH_ALL)

    payments = []
    for amount in (1, 1_000, 6_000, 150_000, deposit - 546, deposit):
        tx, sig = payer.sign_payment(amount)
        hashtype = c.payment_sighash_type(deposit, amount)
        payments.append({
            "amount": amount, "sighash_type": hashtype, "tx": tx.serialize().hex(),
            "digest": c.contract_sighash(tx, contract, deposit, hashtype).hex(),
            "python_signature": sig.hex(),
            "message_tx": payer.payment_message(amount)["tx"],
        })

    dust_change_refusals = []  # amounts whose change would be dust: neither side signs them
    for amount in (deposit - 545, deposit - 1):
        try:
            payer.sign_payment(amount)
        except ChannelError as e:
            dust_change_refusals.append({"amount": amount, "code": e.code})

    next_amounts = []
    for dep in (20_000, 200_000):
        for owed in (0, 500, 1_000, 18_000, 18_454, 18_455, 19_000, 19_454, 19_455, 19_999, 20_000, 199_000):
            for step in (1_000, 1_500):
                ch = PayerChannel(contract, CLIENT, dep, refund_script)
                next_amounts.append({"deposit": dep, "owed": owed, "step": step,
                                     "amount": ch.next_amount(owed, step)})
    return {
        "deposit": deposit, "expiry": expiry, "tip_height": tip, "network": NETWORK,
        "refund_address": refund_address, "terms": terms,
        "funding_txs": funds,
        "funding": {"txid": funding.txid, "vout": funding.vout},
        "refund": {
            "feerate_sat_vb": FEERATE,
            "fee": deposit - refund.vout[0].nValue,
            "vsize": c.refund_vsize(refund_script, contract.witness_script),
            "unsigned_tx": unsigned_refund.serialize().hex(),
            "digest": refund_digest.hex(),
            "python_signed_tx": refund.serialize().hex(),
            "python_signature": refund.wit.vtxinwit[0].scriptWitness.stack[0].hex(),
            "txid": txid_of(refund),
        },
        "payments": payments,
        "dust_change_refusals": dust_change_refusals,
        "next_amounts": next_amounts,
    }


def meter_vectors() -> dict:
    """payer.check_meter and friends on reports a router might send, as Python judges them."""
    tariffs = [Tariff(10, 0), Tariff(0, 60), Tariff(7, 13), Tariff(1_000, 30_000)]
    owed = []
    for t in tariffs:
        for b, sec in ((0, 0), (1, 0), (999_999, 1), (1_000_001, 59), (10**12, 86_400), (2**53, 10**9)):
            owed.append({"tariff": t.to_json(), "bytes": b, "seconds": sec, "owed": t.owed(b, sec)})
    unmetered = [{"tariff": t.to_json(), "elapsed": e, "owed": unmetered_owed(t, e)}
                 for t in tariffs for e in (None, 0, 0.5, 59.9, 3_600)]
    bounds = MeterBounds()
    checks = []
    reports = [
        {"owed": 0, "bytes_used": 0, "seconds_used": 0},
        {"owed": 10, "bytes_used": 1_000_000, "seconds_used": 5},
        {"owed": 11, "bytes_used": 1_000_001, "seconds_used": 5},
        {"owed": 11, "bytes_used": 1_000_000, "seconds_used": 5},
        {"owed": 15, "bytes_used": 0, "seconds_used": 15},
        {"owed": 16, "bytes_used": 0, "seconds_used": 16},
        {"owed": 5_000, "bytes_used": 10**9, "seconds_used": 5},
        {"owed": 10, "bytes_used": 10**10, "seconds_used": 5},
        {"owed": 1, "bytes_used": 0, "seconds_used": 0},
        {"owed": "1", "bytes_used": 0, "seconds_used": 0},
        {"owed": 1, "bytes_used": -1, "seconds_used": 0},
        {"bytes_used": 0, "seconds_used": 0},
        {"owed": 1_000, "bytes_used": 0, "seconds_used": 2},
    ]
    for t in (Tariff(10, 0), Tariff(0, 60)):
        for rep in reports:
            for signed, elapsed in ((0, None), (1_000, None), (1_000, 5.0), (6_000, 5.0), (6_000, 100.0)):
                try:
                    verdict = {"owed": check_meter(rep, t, signed, elapsed, bounds)}
                except ChannelError as e:
                    verdict = {"code": e.code}
                checks.append({"report": rep, "tariff": t.to_json(), "signed_max": signed, "elapsed": elapsed,
                               **verdict})
    return {"bounds": {"max_bytes_per_second": bounds.max_bytes_per_second, "slack_seconds": bounds.slack_seconds},
            "tariff_owed": owed, "unmetered_owed": unmetered, "checks": checks}


def address_vectors() -> dict:
    good = []
    scripts = {
        "p2wpkh": p2wpkh_script(CLIENT.pub),
        "p2pkh": p2pkh_script(CLIENT.pub),
        "p2sh": b"\xa9\x14" + hashlib.new("ripemd160", hashlib.sha256(b"x").digest()).digest() + b"\x87",
        "p2wsh": c.Contract(bytes(SERVER.pub), bytes(CLIENT.pub), 1544).script_pubkey,
        "p2tr": b"\x51\x20" + bytes(SERVER.pub)[1:],
    }
    for net in NETWORKS:
        for kind, script in scripts.items():
            address = script_to_address(script, net)
            assert address_to_script(address, net) == script
            good.append({"network": net, "kind": kind, "address": address, "script": script.hex()})
            if kind in ("p2wpkh", "p2tr"):
                good.append({"network": net, "kind": kind + "-upper", "address": address.upper(),
                             "script": script.hex()})
    # every address judged on every network, as Python judges it (None: refused)
    cross = []
    for net in NETWORKS:
        for other in good:
            try:
                script = address_to_script(other["address"], net).hex()
            except AddressError:
                script = None
            cross.append({"network": net, "address": other["address"], "script": script})
    mine = script_to_address(scripts["p2wpkh"], NETWORK)
    broken = ["", "rb1", "rb1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq", mine[:-1] + ("q" if mine[-1] != "q" else "p"),
              "Rb1" + mine[3:], "1111111111111111111114oLvT2"]
    bad = []
    for address in broken:
        try:
            address_to_script(address, NETWORK)
        except AddressError:
            bad.append({"network": NETWORK, "address": address})
        else:
            raise AssertionError(f"{address} unexpectedly valid")
    return {"good": good, "cross": cross, "bad": bad}


def build() -> dict:
    try:
        c.refund_tx(c.Outpoint("00" * 32, 0), 600, 10, b"\x00\x14" + bytes(20), 100)
    except ChannelError as e:
        tiny_refund_code = e.code
    return {
        "_comment": "generated by tests/js/make_vectors.py from the Python reference; do not edit",
        "keys": {
            "client_secret": hashlib.sha256(b"bitmesh client").hexdigest(),
            "client_pubkey": bytes(CLIENT.pub).hex(),
            "server_pubkey": bytes(SERVER.pub).hex(),
            "refund_pubkey": bytes(REFUND.pub).hex(),
        },
        "dust_limit": c.DUST_LIMIT_SAT,
        "tiny_refund_code": tiny_refund_code,
        "contracts": contracts(),
        "channel": channel_vectors(),
        "addresses": address_vectors(),
        "meter": meter_vectors(),
        "bip21_amounts": [{"sat": s, "btc": _btc(s)}
                          for s in (1, 546, 20_000, 200_000, 100_000_000, 2_100_000_000_000_000)],
    }


def main() -> None:
    text = json.dumps(build(), indent=1, sort_keys=True) + "\n"
    if "--stdout" in sys.argv:
        sys.stdout.write(text)
    else:
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(text)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
