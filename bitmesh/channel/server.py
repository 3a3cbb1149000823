"""Server rules: every check a channel request must pass, as pure functions.

Each function takes the current `Channel` and returns a new one or raises `ChannelError`
with a stable code; nothing here does I/O, so a refusal can never leave state half-changed.
The manager (bitmesh.channel.manager) persists what these functions return.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bitcoin.core import CTransaction, b2lx
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
    # A chain view older than this counts as inside the margin (payments refused, settlement
    # due): 20 min is 2 blocks on average, a sixth of the default margin; the chain moves 6
    # blocks (half the margin) in that time with a probability of about 1.7 %.
    chain_stale_seconds: int = 1200
    zero_conf_max_sat: int = 50_000
    # Deposits of all channels in use before their funding confirmed, summed: what one wave
    # of double spends could take at most (zero_conf_max_sat bounds one channel only).
    zero_conf_total_max_sat: int = 500_000
    min_conf: int = 1
    prepay_step_sat: int = 1_000
    sat_per_mb: int = 10
    sat_per_minute: int = 0
    # Why new channels are refused now (uplink mode: the upstream credit cannot be kept ahead);
    # None: open for business. Checked at open from the same snapshot the price is taken from.
    closed_reason: str | None = None


# Seconds a refused open is told to wait (Retry-After): the uplink pass runs every 2 s, but what
# ends a stop (a top-up of the owner's wallet, a budget raised, the upstream back) takes longer.
NOT_SELLING_RETRY_AFTER = 30


class NotSelling(ChannelError):
    """New channels are refused for now (the hotspot is not selling): retry after `retry_after` s."""

    code = "not_selling"
    http_status = 503

    def __init__(self, reason: str, retry_after: int = NOT_SELLING_RETRY_AFTER):
        super().__init__(f"this hotspot is not selling access now ({reason}); retry in {retry_after} s")
        self.reason, self.retry_after = reason, retry_after

    def to_json(self) -> dict:
        out = super().to_json()
        out["error"].update(reason=self.reason, retry_after=self.retry_after)
        return out


def _refuse(code: str, message: str, status: int = 409) -> ChannelError:
    return ChannelError(message, code=code, http_status=status)


# --- open ----------------------------------------------------------------------------------


def check_selling(policy: ChannelPolicy) -> None:
    if policy.closed_reason is not None:
        raise NotSelling(policy.closed_reason)


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


# A funding used at 0-conf must pay at least this (the minimum relay feerate: below it the
# transaction may not even reach the miners), and at least what the backend estimates it takes to
# confirm within half the blocks left before the settlement margin.
ZERO_CONF_MIN_FEERATE_SAT_VB = 1.0
# How many unconfirmed ancestors of a funding are judged (Bitcoin Core's default mempool limit
# is 25); a funding with more waits for its confirmations, as does one the backend cannot show.
MAX_UNCONFIRMED_ANCESTORS = 25
BIP125_FINAL_SEQUENCE = 0xFFFFFFFE  # an input below this signals replaceability (BIP125)


def funding_usable(policy: ChannelPolicy, deposit: int, confirmations: int) -> bool:
    """A waiting channel opens when its funding has min_conf confirmations. Using a funding
    before that (0-conf) is judged once, at submission (accept_funding): never here."""
    del deposit  # kept for callers: the 0-conf judgement needs more than the deposit
    return confirmations >= policy.min_conf


def backend_tx(raw: bytes, txid: str) -> CTransaction:
    """The backend's bytes for `txid`, only if they are that transaction: a backend that
    answers other bytes (a bug, a compromised server) must not fund a channel."""
    try:
        tx = CTransaction.deserialize(raw)
    except Exception:  # python-bitcoinlib raises several types on garbage
        raise _refuse("funding_txid_mismatch", f"the chain backend answered garbage for {txid}", 502) from None
    if c.txid_of(tx) != txid:
        raise _refuse(
            "funding_txid_mismatch",
            f"the chain backend answered a transaction {c.txid_of(tx)} for {txid}", 502)
    return tx


def zero_conf_in_use(policy: ChannelPolicy, channels: Iterable[Channel], exclude: str) -> int:
    """Deposits of the channels taking (or settling) payments on a funding below min_conf."""
    return sum(
        ch.deposit for ch in channels
        if ch.id != exclude and ch.phase in (Phase.OPEN, Phase.SETTLING) and ch.funding is not None
        and ch.funding_confirmations < policy.min_conf
    )


def zero_conf_cap_refusal(policy: ChannelPolicy, deposit: int, in_use: int) -> str | None:
    """Why a deposit may not be used before it confirms, as far as the caps go; None: it may."""
    if deposit > policy.zero_conf_max_sat:
        return f"deposit {deposit} sat is above the 0-conf cap of {policy.zero_conf_max_sat} sat per channel"
    if in_use + deposit > policy.zero_conf_total_max_sat:
        return (f"{in_use} sat of unconfirmed deposits are in use; {deposit} more would pass the total 0-conf cap "
                f"of {policy.zero_conf_total_max_sat} sat")
    return None


def zero_conf_target_blocks(channel: Channel, policy: ChannelPolicy, tip_height: int) -> int:
    """Blocks a 0-conf funding should confirm within: half of those left before the margin."""
    if channel.contract.expiry_is_time:
        return 6
    return max(1, min(144, (channel.expiry - policy.settle_margin_blocks - tip_height) // 2))


def signals_rbf(tx: CTransaction) -> bool:
    return any(txin.nSequence < BIP125_FINAL_SEQUENCE for txin in tx.vin)


def vsize(tx: CTransaction) -> int:
    """Virtual size (BIP141): stripped size x 3 + full size, in vbytes rounded up."""
    stripped = len(CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion).serialize())
    return (stripped * 3 + len(tx.serialize()) + 3) // 4


Lookup = Callable[[str], tuple[CTransaction, int] | None]  # txid -> (tx, confirmations)


def funding_risk_refusal(funding: CTransaction, lookup: Lookup, min_feerate_sat_vb: float) -> str | None:
    """Why an unconfirmed funding may not be used before it confirms; None: it may.

    It must not signal replaceability (BIP125), nor may any unconfirmed ancestor (replaceability
    is inherited); its own feerate and that of it with all its unconfirmed ancestors (what a
    miner weighs) must reach `min_feerate_sat_vb`. Every unconfirmed ancestor is judged, up to
    MAX_UNCONFIRMED_ANCESTORS; `lookup` gives what the backend knows of a txid (checked to hash
    to it), None when it knows nothing: then the funding waits for its confirmations.
    """
    if signals_rbf(funding):
        return "the funding signals replaceability (BIP125): it waits for its confirmations"
    seen: dict[str, tuple[CTransaction, int] | None] = {}

    def known(txid: str) -> tuple[CTransaction, int] | None:
        if txid not in seen:
            seen[txid] = lookup(txid)
        return seen[txid]

    def fee_of(tx: CTransaction) -> int | None:
        total_in = 0
        for txin in tx.vin:
            parent = known(b2lx(txin.prevout.hash))
            if parent is None or txin.prevout.n >= len(parent[0].vout):
                return None
            total_in += parent[0].vout[txin.prevout.n].nValue
        return total_in - sum(out.nValue for out in tx.vout)

    own_fee = fee_of(funding)
    if own_fee is None:
        return "the backend does not know every input of the funding: it waits for its confirmations"
    own_vsize = vsize(funding)
    package_fee, package_vsize = own_fee, own_vsize
    queue = [b2lx(txin.prevout.hash) for txin in funding.vin]
    ancestors: set[str] = set()
    while queue:
        txid = queue.pop()
        entry = known(txid)
        if entry is None:
            return "the backend does not know an ancestor of the funding: it waits for its confirmations"
        tx, confirmations = entry
        if confirmations > 0 or txid in ancestors:
            continue
        ancestors.add(txid)
        if len(ancestors) > MAX_UNCONFIRMED_ANCESTORS:
            return (f"the funding has more than {MAX_UNCONFIRMED_ANCESTORS} unconfirmed ancestors: "
                    "it waits for its confirmations")
        if signals_rbf(tx):
            return f"unconfirmed ancestor {txid} signals replaceability (BIP125): the funding waits"
        fee = fee_of(tx)
        if fee is None:
            return "the backend does not know an ancestor of the funding: it waits for its confirmations"
        package_fee += fee
        package_vsize += vsize(tx)
        queue += [b2lx(txin.prevout.hash) for txin in tx.vin]
    rate = min(own_fee / own_vsize, package_fee / package_vsize)
    if rate < min_feerate_sat_vb:
        return (f"the funding pays {rate:.2f} sat/vB (with its unconfirmed ancestors), below the "
                f"{min_feerate_sat_vb:.2f} sat/vB 0-conf needs: it waits for its confirmations")
    return None


def accept_funding(
    channel: Channel, policy: ChannelPolicy, funding: c.Outpoint, confirmations: int, zero_conf_refusal: str | None
) -> Channel:
    """`zero_conf_refusal`: why the funding may not be used before min_conf (None: it may)."""
    if channel.phase is not Phase.AWAITING_FUNDING:
        if channel.funding == funding:
            return channel  # the same funding again: idempotent
        raise _refuse("channel_already_funded", f"channel is {channel.phase.value}")
    usable = confirmations >= policy.min_conf or zero_conf_refusal is None
    phase = Phase.OPEN if usable else Phase.FUNDING_UNCONFIRMED
    return channel.evolve(funding=funding, funding_confirmations=confirmations, phase=phase)


# --- expiry --------------------------------------------------------------------------------


def within_settle_margin(
    channel: Channel, policy: ChannelPolicy, tip_height: int, mtp: int, view_age: float = 0.0
) -> bool:
    """True once the channel must be settled (and may take no more payments). `view_age`:
    seconds since the backend last answered; a view older than `chain_stale_seconds` may hide
    any number of blocks, so it counts as inside the margin."""
    if view_age > policy.chain_stale_seconds:
        return True
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
    change = c.change_after(channel.deposit, amount)
    if 0 < change < c.DUST_LIMIT_SAT:
        # No output can return it, so the settlement would hand the client's sats to miners.
        raise _refuse(
            "payment_dust_change",
            f"a change of {change} sat is below the dust limit: pay the whole deposit ({channel.deposit}) instead",
            400,
        )
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
    if change == 0:
        return  # paying everything: outputs are the server's to choose (a dust change is refused before)
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
    """The fully signed settlement: client change, the owner's share to the router's hold
    output (bumped by CPFP while unconfirmed, then paid out to the owner), unused credit back.
    Raises `settlement_uneconomic` when the owner's share does not pay the fees and keep dust."""
    if channel.funding is None or not channel.payment_sig:
        raise _refuse("nothing_to_settle", "channel has no payment to settle")
    script = channel.contract.witness_script
    hold = c.hold_script(channel.server_pubkey)
    payout_fee = c.fee_for(feerate_sat_vb, c.hold_spend_vsize(policy.payout_script))
    plan = c.plan_settlement(
        channel.deposit, channel.paid, owed, feerate_sat_vb, channel.refund_script, hold, script, payout_fee
    )
    tx = c.settlement_tx(channel.funding, plan, channel.refund_script, hold)
    digest = c.contract_sighash(tx, channel.contract, channel.deposit, SIGHASH_ALL)
    server_sig = c.sign(server_key, digest, SIGHASH_ALL)
    return c.with_witness(tx, c.settlement_witness(channel.payment_sig, server_sig, script))
