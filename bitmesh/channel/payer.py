"""The payer's side of a channel: check the server's terms, fund, keep a refund, sign payments.

Pure transaction building and signing; the HTTP conversation is in bitmesh.portal.client.
Order matters and is enforced by `PayerChannel`: the refund transaction is built and signed
before the funding transaction is handed to anybody.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitcoin.core import CMutableTransaction, CMutableTxIn, CTransaction, CTxInWitness, CTxOut, CTxWitness
from bitcoin.core.script import SIGHASH_ALL, SIGVERSION_WITNESS_V0, CScript, CScriptWitness, SignatureHash
from bitcoin.wallet import CKey

from bitmesh.chain.address import p2pkh_script, p2wpkh_script
from bitmesh.channel import contract as c
from bitmesh.errors import BitMeshError, ChannelError
from bitmesh.tariff import Tariff


def _refuse(code: str, message: str) -> ChannelError:
    return ChannelError(message, code=code, http_status=400)


# --- terms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PayerLimits:
    """What this payer accepts: how long its deposit may be locked, how much margin it needs."""

    max_expiry_blocks: int = 1008  # about a week: the refund waits this long at worst
    min_expiry_blocks: int = 6


def check_terms(
    terms: dict, client_pubkey: bytes, deposit: int, refund_script: bytes, tip_height: int, limits: PayerLimits
) -> c.Contract:
    """Rebuild the contract from the server's answer and refuse anything that differs."""
    try:
        server_pubkey = bytes.fromhex(terms["server_pubkey"])
        expiry = int(terms["expiry"])
        witness_script = bytes.fromhex(terms["witness_script"])
    except (KeyError, ValueError, TypeError):
        raise _refuse("terms_malformed", "server terms lack server_pubkey, expiry or witness_script") from None
    c.check_pubkey(server_pubkey, "server_pubkey")
    if server_pubkey == client_pubkey:
        raise _refuse("terms_invalid", "server reused the client's key")
    if expiry >= c.LOCKTIME_THRESHOLD:
        raise _refuse("terms_invalid", "this payer only accepts block-height expiries")
    if not tip_height + limits.min_expiry_blocks <= expiry <= tip_height + limits.max_expiry_blocks:
        raise _refuse(
            "expiry_out_of_range",
            f"expiry {expiry} is outside [{tip_height + limits.min_expiry_blocks}, "
            f"{tip_height + limits.max_expiry_blocks}]",
        )
    contract = c.Contract(server_pubkey, client_pubkey, expiry)
    if contract.witness_script != witness_script:
        raise _refuse("terms_invalid", "server's witness script is not the protocol's contract")
    if terms.get("funding_script") != contract.script_pubkey.hex():
        raise _refuse("terms_invalid", "server's funding script does not match the contract")
    if terms.get("deposit") != deposit or terms.get("refund_script") != refund_script.hex():
        raise _refuse("terms_invalid", "server changed the deposit or the refund script")
    return contract


@dataclass(frozen=True)
class OfferTerms:
    """What the payer keeps from the offer it opened on: the router cannot change them later."""

    prepay_step: int  # never sign more than this ahead of what is plausibly owed
    tariff: Tariff  # what the meter's figures are billed at
    metered: bool = True  # False: the router measures nothing and calls all that is paid owed


def offer_terms(offer: dict) -> OfferTerms:
    def whole(value) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError
        return value

    try:
        step, tariff, metered = whole(offer["prepay_step_sat"]), offer["tariff"], offer.get("metered", True)
        if step <= 0 or not isinstance(metered, bool):
            raise ValueError
        return OfferTerms(step, Tariff(whole(tariff["sat_per_mb"]), whole(tariff["sat_per_minute"])), metered)
    except (KeyError, TypeError, ValueError, BitMeshError):  # Tariff refuses no price or a negative one
        raise _refuse("terms_malformed", "the offer lacks a valid prepay_step_sat or tariff") from None


# --- the router's meter, checked ------------------------------------------------------------


@dataclass(frozen=True)
class MeterBounds:
    """What a payer believes without the router's word: no link moves bytes faster than this,
    and the router's clock and meter may run this much ahead of the payer's."""

    max_bytes_per_second: int = 300_000_000  # 2.4 Gbit/s, upload plus download: beyond any Wi-Fi client
    slack_seconds: int = 10  # meter passes, whole-second rounding, request latency


def unmetered_owed(tariff: Tariff, elapsed_seconds: float | None) -> int:
    """What this payer owes a router that measures nothing ("metered": false, whose `owed` is
    all that was paid, not a reading): the time since its first payment at the tariff's time
    price, by its own clock; bytes nobody counted are not paid for beyond the prepaid step."""
    return 0 if elapsed_seconds is None else tariff.owed(0, int(max(0.0, elapsed_seconds)))


def check_meter(report: dict, tariff: Tariff, signed_max: int, elapsed_seconds: float | None,
                bounds: MeterBounds = MeterBounds()) -> int:
    """The router's `owed` from a session report (GET /api/session), if it is plausible.

    Plausible: the usage fits the time since this payer's first payment (`elapsed_seconds`;
    None: no payment yet, so nothing can be owed) at the link's top speed, `owed` is no more than
    that usage costs at the tariff fixed at open, and no more than this payer ever signed
    (`signed_max`). Anything else is refused (owed_implausible): paying owed + one step on the
    router's word alone would let it take a step per poll, up to the whole deposit.
    """
    figures = [report.get(k) for k in ("owed", "bytes_used", "seconds_used")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in figures):
        raise _refuse("meter_malformed", "the router's session lacks owed, bytes_used or seconds_used")
    owed, bytes_used, seconds_used = figures
    if owed > signed_max:
        raise _refuse("owed_implausible", f"the router says {owed} sat are owed, more than the {signed_max} sat "
                      "this payer ever signed; not paying it")
    if elapsed_seconds is None:
        if owed:
            raise _refuse("owed_implausible", f"the router says {owed} sat are owed before any payment; not paying it")
        return 0
    window = max(0.0, elapsed_seconds) + bounds.slack_seconds
    if seconds_used > window:
        raise _refuse("owed_implausible", f"the router counts {seconds_used} s of access, but only "
                      f"{elapsed_seconds:.0f} s passed since the first payment; not paying it")
    if bytes_used > bounds.max_bytes_per_second * window:
        raise _refuse("owed_implausible", f"the router counts {bytes_used} bytes in {elapsed_seconds:.0f} s, "
                      f"faster than any link ({bounds.max_bytes_per_second} bytes/s); not paying it")
    billable = tariff.owed(bytes_used, seconds_used)
    if owed > billable:
        raise _refuse("owed_implausible", f"the router says {owed} sat are owed, but {bytes_used} bytes and "
                      f"{seconds_used} s at the tariff agreed at open ({tariff.sat_per_mb} sat/MB, "
                      f"{tariff.sat_per_minute} sat/min) cost {billable}; not paying it")
    return owed


# --- funding from known coins --------------------------------------------------------------


@dataclass(frozen=True)
class Coin:
    """An output the payer can spend: P2WPKH or P2PKH of `key`."""

    outpoint: c.Outpoint
    value: int
    script_pubkey: bytes
    key: CKey

    @property
    def segwit(self) -> bool:
        return self.script_pubkey == p2wpkh_script(self.key.pub)


def _funding_vsize(inputs: list[Coin], change_script: bytes) -> int:
    size = 11 + 43 + 9 + len(change_script)
    for coin in inputs:
        size += 68 if coin.segwit else 148
    return size


def build_funding(
    coins: list[Coin], deposit: int, contract: c.Contract, change_script: bytes, feerate_sat_vb: float
) -> CTransaction:
    """Pay `deposit` to the contract from `coins` (largest first), change back; fully signed."""
    chosen: list[Coin] = []
    for coin in sorted(coins, key=lambda s: s.value, reverse=True):
        chosen.append(coin)
        fee = int(feerate_sat_vb * _funding_vsize(chosen, change_script)) + 1
        if sum(s.value for s in chosen) >= deposit + fee:
            break
    else:
        raise _refuse("insufficient_funds", f"coins do not cover {deposit} sat plus fee")
    change = sum(s.value for s in chosen) - deposit - fee
    vout = [CTxOut(deposit, CScript(contract.script_pubkey))]
    if change >= c.DUST_LIMIT_SAT:
        vout.append(CTxOut(change, CScript(change_script)))
    tx = CMutableTransaction([CMutableTxIn(s.outpoint.to_core()) for s in chosen], vout, 0, c.TX_VERSION)
    witnesses = []
    for i, spend in enumerate(chosen):
        key = spend.key
        if spend.segwit:
            digest = SignatureHash(CScript(p2pkh_script(key.pub)), tx, i, SIGHASH_ALL, spend.value,
                                   SIGVERSION_WITNESS_V0)
            witnesses.append(CTxInWitness(CScriptWitness([c.sign(key, digest, SIGHASH_ALL), key.pub])))
        else:
            digest = SignatureHash(CScript(spend.script_pubkey), tx, i, SIGHASH_ALL)
            tx.vin[i].scriptSig = CScript([c.sign(key, digest, SIGHASH_ALL), key.pub])
            witnesses.append(CTxInWitness())
    if any(s.segwit for s in chosen):
        tx.wit = CTxWitness(witnesses)
    return CTransaction.from_tx(tx)


# --- the channel as the payer holds it -----------------------------------------------------


@dataclass
class PayerChannel:
    """One open channel from the payer's side."""

    contract: c.Contract
    client_key: CKey
    deposit: int
    refund_script: bytes
    funding: c.Outpoint | None = None
    refund: CTransaction | None = None
    paid: int = 0
    signed_max: int = 0  # the largest amount ever signed: the most the router can claim was paid

    def prepare_refund(self, funding: c.Outpoint, feerate_sat_vb: float) -> CTransaction:
        """Sign the refund for `funding` now, before the funding leaves the payer."""
        script = self.contract.witness_script
        fee = int(feerate_sat_vb * c.refund_vsize(self.refund_script, script)) + 1
        tx = c.refund_tx(funding, self.deposit, self.contract.expiry, self.refund_script, fee)
        digest = c.contract_sighash(tx, self.contract, self.deposit, SIGHASH_ALL)
        sig = c.sign(self.client_key, digest, SIGHASH_ALL)
        self.funding = funding
        self.refund = c.with_witness(tx, c.refund_witness(sig, script))
        return self.refund

    def next_amount(self, owed: int, prepay_step: int) -> int:
        """Never more than what is owed plus one prepay step; all of it when the change
        left would be dust (it could not be paid back anyway)."""
        amount = min(self.deposit, owed + prepay_step)
        if c.change_after(self.deposit, amount) < c.DUST_LIMIT_SAT:
            amount = self.deposit
        return amount

    def sign_payment(self, amount: int) -> tuple[CTransaction, bytes]:
        if self.funding is None or self.refund is None:
            raise _refuse("refund_missing", "prepare the refund before signing any payment")
        if not self.paid < amount <= self.deposit:
            raise _refuse("payment_not_increasing", f"amount {amount} must be in ({self.paid}, {self.deposit}]")
        if 0 < c.change_after(self.deposit, amount) < c.DUST_LIMIT_SAT:
            raise _refuse("payment_dust_change", f"a change of {self.deposit - amount} sat would go to miners: "
                          "pay the whole deposit instead")
        self.signed_max = max(self.signed_max, amount)  # the router may hold this one now
        tx = c.payment_tx(self.funding, self.deposit, amount, self.refund_script)
        hashtype = c.payment_sighash_type(self.deposit, amount)
        digest = c.contract_sighash(tx, self.contract, self.deposit, hashtype)
        return tx, c.sign(self.client_key, digest, hashtype)

    def payment_message(self, amount: int) -> dict:
        tx, sig = self.sign_payment(amount)
        return {"amount": amount, "tx": tx.serialize().hex(), "signature": sig.hex()}

    def acknowledged(self, amount: int) -> None:
        """The server stored `amount`: it is now the floor for the next payment."""
        self.paid = max(self.paid, amount)
