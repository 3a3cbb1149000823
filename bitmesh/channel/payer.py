"""The payer's side of a channel: check the server's terms, fund, keep a refund, sign payments.

Pure transaction building and signing; the HTTP conversation is in bitmesh.portal.client.
Order matters and is enforced by `PayerChannel`: the refund transaction is built and signed
before the funding transaction is handed to anybody.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bitcoin.core import CMutableTransaction, CMutableTxIn, CTransaction, CTxInWitness, CTxOut, CTxWitness
from bitcoin.core.script import SIGHASH_ALL, SIGVERSION_WITNESS_V0, CScript, CScriptWitness, SignatureHash
from bitcoin.wallet import CKey

from bitmesh.chain.address import p2pkh_script, p2wpkh_script
from bitmesh.channel import contract as c
from bitmesh.errors import ChannelError


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
    signed: list[int] = field(default_factory=list, repr=False)

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
