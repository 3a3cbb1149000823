"""Server rules: every check a channel request must pass, as pure functions.

Each function takes the current `Channel` and returns a new one or raises `ChannelError`
with a stable code; nothing here does I/O, so a refusal can never leave state half-changed.
The manager (bitmesh.channel.manager) persists what these functions return.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitcoin.core import CTransaction
from bitcoin.core.script import SIGHASH_ALL

from bitmesh.channel import contract as c
from bitmesh.channel.state import Channel, Phase
from bitmesh.errors import ChannelError


@dataclass(frozen=True)
class ChannelPolicy:
    """The owner's terms for new channels (from the config)."""

    network: str
    payout_script: bytes
    min_deposit_sat: int = 10_000
    max_deposit_sat: int = 1_000_000
    expiry_blocks: int = 144
    # Settle this many blocks before expiry (and refuse payments inside the margin): after
    # expiry the client could take its refund and the server's earnings with it.
    settle_margin_blocks: int = 12
    # For unix-time expiries (CLTV checks them against median-time-past, ~1 h behind).
    settle_margin_seconds: int = 7200
    zero_conf_max_sat: int = 50_000
    min_conf: int = 1
    prepay_step_sat: int = 1_000
    sat_per_mb: int = 10
    sat_per_minute: int = 0


def _refuse(code: str, message: str, status: int = 409) -> ChannelError:
    return ChannelError(message, code=code, http_status=status)


# --- open ----------------------------------------------------------------------------------


def check_deposit(policy: ChannelPolicy, deposit: int) -> None:
    if not policy.min_deposit_sat <= deposit <= policy.max_deposit_sat:
        raise _refuse(
            "deposit_out_of_range",
            f"deposit must be between {policy.min_deposit_sat} and {policy.max_deposit_sat} sat",
            400,
        )


# --- funding -------------------------------------------------------------------------------


def find_funding_output(channel: Channel, tx: CTransaction, vout: int | None) -> c.Outpoint:
    """The output of `tx` that funds `channel`: script and amount must match exactly."""
    script = channel.contract.script_pubkey
    if vout is None:
        matches = [i for i, out in enumerate(tx.vout) if bytes(out.scriptPubKey) == script]
        if not matches:
            raise _refuse("funding_script_mismatch", "no output pays the channel's contract address", 400)
        vout = matches[0]
    if not 0 <= vout < len(tx.vout):
        raise _refuse("funding_output_missing", f"funding transaction has no output {vout}", 400)
    out = tx.vout[vout]
    if bytes(out.scriptPubKey) != script:
        raise _refuse("funding_script_mismatch", f"output {vout} does not pay the channel's contract", 400)
    if out.nValue != channel.deposit:
        raise _refuse(
            "funding_amount_mismatch", f"output {vout} pays {out.nValue} sat, the channel needs {channel.deposit}", 400
        )
    return c.Outpoint(c.txid_of(tx), vout)


def funding_usable(policy: ChannelPolicy, deposit: int, confirmations: int) -> bool:
    """0-conf up to the owner's risk cap; above it, wait for min_conf."""
    return confirmations >= policy.min_conf or deposit <= policy.zero_conf_max_sat


def accept_funding(channel: Channel, policy: ChannelPolicy, funding: c.Outpoint, confirmations: int) -> Channel:
    if channel.phase is not Phase.AWAITING_FUNDING:
        if channel.funding == funding:
            return channel  # the same funding again: idempotent
        raise _refuse("channel_already_funded", f"channel is {channel.phase.value}")
    phase = Phase.OPEN if funding_usable(policy, channel.deposit, confirmations) else Phase.FUNDING_UNCONFIRMED
    return channel.evolve(funding=funding, funding_confirmations=confirmations, phase=phase)


# --- expiry --------------------------------------------------------------------------------


def within_settle_margin(channel: Channel, policy: ChannelPolicy, tip_height: int, mtp: int) -> bool:
    """True once the channel must be settled (and may take no more payments)."""
    if channel.contract.expiry_is_time:
        return mtp >= channel.expiry - policy.settle_margin_seconds
    # The next block is tip + 1; a refund becomes valid at height `expiry`.
    return tip_height + 1 >= channel.expiry - policy.settle_margin_blocks


# --- payments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payment:
    """A payment as it arrives: the new total, the client's spend and its signature."""

    amount: int
    tx: CTransaction
    signature: bytes  # DER + sighash byte


def accept_payment(
    channel: Channel, policy: ChannelPolicy, payment: Payment, tip_height: int, mtp: int
) -> Channel:
    """Validate `payment` against `channel`; returns the channel with the new total."""
    if not channel.phase.accepts_payments:
        raise _refuse("channel_not_open", f"channel is {channel.phase.value}, not open")
    if within_settle_margin(channel, policy, tip_height, mtp):
        raise _refuse("channel_expiring", "channel is inside its settlement margin; open a new one")
    amount = payment.amount
    if amount <= channel.paid:
        raise _refuse("payment_not_increasing", f"amount {amount} does not exceed the last payment {channel.paid}")
    if amount > channel.deposit:
        raise _refuse("payment_exceeds_deposit", f"amount {amount} exceeds the deposit {channel.deposit}")
    assert channel.funding is not None
    _check_spend_shape(channel, payment)
    der, hashtype = c.split_signature(payment.signature)
    expected_type = c.payment_sighash_type(channel.deposit, amount)
    if hashtype != expected_type:
        raise _refuse(
            "wrong_sighash",
            f"sighash type must be {expected_type:#04x} for this amount, got {hashtype:#04x}",
            400,
        )
    # Verify over the transaction the server builds itself, never over the client's bytes.
    digest = c.payment_sighash(channel.contract, channel.funding, channel.deposit, amount, channel.refund_script)
    c.check_signature(channel.client_pubkey, digest, der)
    return channel.evolve(paid=amount, payment_sig=payment.signature)


def _check_spend_shape(channel: Channel, payment: Payment) -> None:
    """The client's spend must be the protocol's template; a specific code for each way it is not."""
    tx = payment.tx
    assert channel.funding is not None
    if (
        len(tx.vin) != 1
        or tx.vin[0].prevout != channel.funding.to_core()
        or tx.vin[0].nSequence != c.CONTRACT_INPUT_SEQUENCE
        or tx.nLockTime != c.SETTLEMENT_LOCKTIME
        or tx.nVersion != c.TX_VERSION
    ):
        raise _refuse("payment_tx_invalid", "the spend must have the funding outpoint as its only input "
                      "with the protocol's version, sequence and locktime", 400)
    change = c.change_after(channel.deposit, payment.amount)
    if change < c.DUST_LIMIT_SAT:
        if change and tx.vout and bytes(tx.vout[0].scriptPubKey) == channel.refund_script:
            raise _refuse("change_dust", f"change of {change} sat is dust; pay the whole deposit instead", 400)
        return  # paying everything: outputs are the server's to choose
    if not tx.vout:
        raise _refuse("change_missing", "the spend has no change output", 400)
    out = tx.vout[0]
    if bytes(out.scriptPubKey) != channel.refund_script:
        raise _refuse("change_script_mismatch", "output 0 does not pay the channel's refund address", 400)
    if out.nValue != change:
        raise _refuse("change_amount_mismatch", f"output 0 pays {out.nValue} sat, expected {change}", 400)


# --- settlement ----------------------------------------------------------------------------


def build_settlement(
    channel: Channel, policy: ChannelPolicy, server_key, owed: int, feerate_sat_vb: float
) -> CTransaction:
    """The fully signed settlement: client change, owner payout, unused credit back."""
    if channel.funding is None or not channel.payment_sig:
        raise _refuse("nothing_to_settle", "channel has no payment to settle")
    script = channel.contract.witness_script
    plan = c.plan_settlement(
        channel.deposit, channel.paid, owed, feerate_sat_vb, channel.refund_script, policy.payout_script, script
    )
    tx = c.settlement_tx(channel.funding, plan, channel.refund_script, policy.payout_script)
    digest = c.contract_sighash(tx, channel.contract, channel.deposit, SIGHASH_ALL)
    server_sig = c.sign(server_key, digest, SIGHASH_ALL)
    return c.with_witness(tx, c.settlement_witness(channel.payment_sig, server_sig, script))
