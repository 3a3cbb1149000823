"""Channel orchestration: the rules (server.py) + the ledger + the keys + the chain.

Like Electrum's lnworker: it owns the channels, applies the pure rules, persists every
accepted change before answering, and talks to the chain. Chain watching (funding depth,
double spends, auto-settlement before expiry, settlement confirmation) is `watch()`; the
service calls it on a timer, never in a busy loop.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bitcoin.core import CTransaction

from bitmesh.chain.base import FALLBACK_FEERATE_SAT_VB, ChainBackend, TxStatus
from bitmesh.channel import contract as c
from bitmesh.channel import server as rules
from bitmesh.channel.keys import ChannelKeychain
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.state import Channel, Phase
from bitmesh.channel.wire import FundingRequest, OpenRequest
from bitmesh.errors import BroadcastRejected, ChainError, ChannelError

log = logging.getLogger(__name__)

Listener = Callable[[Channel, Channel | None], None]  # (new, previous)


@dataclass(frozen=True)
class ChainView:
    tip_height: int
    mtp: int
    taken_at: float = 0.0  # clock() when the backend answered


class ChannelManager:
    def __init__(
        self,
        policy: rules.ChannelPolicy,
        ledger: Ledger,
        keychain: ChannelKeychain,
        chain: ChainBackend,
        clock: Callable[[], float] = time.time,
        owed: Callable[[Channel], int] | None = None,
    ):
        self.policy = policy
        self.ledger = ledger
        self.keychain = keychain
        self.chain = chain
        self.clock = clock
        # What the client used, asked at settlement (the meter); default: all it paid.
        self.owed = owed or (lambda ch: ch.paid)
        self.listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._channels: dict[str, Channel] = ledger.load()
        self._next_key_index = max((ch.key_index for ch in self._channels.values()), default=-1) + 1
        self._view: ChainView | None = None
        self.chain_error: str | None = None  # why the last chain refresh failed; None after a success
        self._last_feerate: float | None = None

    # --- reading ---------------------------------------------------------------------------

    def get(self, channel_id: str) -> Channel:
        try:
            return self._channels[channel_id]
        except KeyError:
            raise ChannelError(f"no channel {channel_id!r}", code="channel_unknown", http_status=404) from None

    def channels(self) -> list[Channel]:
        return list(self._channels.values())

    def chain_view(self, refresh: bool = False) -> ChainView:
        if refresh or self._view is None:
            try:
                self._view = ChainView(self.chain.tip_height(), self.chain.median_time_past(), self.clock())
            except ChainError as e:
                self.chain_error = e.message
                raise
            self.chain_error = None
        return self._view

    @property
    def last_chain_view(self) -> ChainView | None:
        """The chain as last seen, without asking the backend (for status pages)."""
        return self._view

    # --- state changes ---------------------------------------------------------------------

    def _commit(self, new: Channel, payment_only: bool = False) -> Channel:
        """Persist, then publish. Call with the lock held."""
        new = new.evolve(updated_at=int(self.clock()))
        old = self._channels.get(new.id)
        if payment_only:
            self.ledger.put_payment(new)
        else:
            self.ledger.put(new)
        self._channels[new.id] = new
        for listener in self.listeners:
            try:
                listener(new, old)
            except Exception:  # a listener must never undo a persisted payment
                log.exception("channel listener failed")
        return new

    def open_channel(self, req: OpenRequest, client_mac: str = "", client_ip: str = "") -> Channel:
        """New channel terms; the session is bound to the caller's MAC and IP (the portal
        finds them), which is where access will be granted once it pays."""
        rules.check_deposit(self.policy, req.deposit)
        view = self.chain_view(refresh=True)
        with self._lock:
            index = self._next_key_index
            server_key = self.keychain.key(index)
            channel = Channel(
                id=secrets.token_hex(16),
                key_index=index,
                client_pubkey=req.client_pubkey,
                server_pubkey=bytes(server_key.pub),
                deposit=req.deposit,
                expiry=view.tip_height + self.policy.expiry_blocks,
                refund_script=req.refund_script,
                created_at=int(self.clock()),
                client_mac=client_mac,
                client_ip=client_ip,
                sat_per_mb=self.policy.sat_per_mb,
                sat_per_minute=self.policy.sat_per_minute,
            )
            # The key index is on disk before the key is handed out: never reused after a crash.
            self._next_key_index = index + 1
            return self._commit(channel)

    def submit_funding(self, channel_id: str, req: FundingRequest) -> Channel:
        channel = self.get(channel_id)
        if channel.phase is not Phase.AWAITING_FUNDING:
            if req.outpoint and channel.funding == req.outpoint:
                return channel
            raise ChannelError(f"channel is {channel.phase.value}", code="channel_already_funded")
        if req.tx is not None:
            outpoint = rules.find_funding_output(channel, req.tx, req.outpoint.vout if req.outpoint else None)
            self.chain.broadcast(req.tx.serialize())
            status = self.chain.get_tx(outpoint.txid)
        else:
            assert req.outpoint is not None
            outpoint = req.outpoint
            status = self.chain.get_tx(outpoint.txid)
            if status is None:
                raise ChannelError("funding transaction not found", code="funding_not_found", http_status=404)
            rules.find_funding_output(channel, CTransaction.deserialize(status.raw), outpoint.vout)
        if status is None:
            raise ChannelError("funding transaction vanished after broadcast", code="funding_not_found")
        # The output must still be there to be spent by the contract.
        if self.chain.get_outspend(outpoint.txid, outpoint.vout).spent:
            raise ChannelError("funding output is already spent", code="funding_double_spent")
        view = self.chain_view(refresh=True)
        if rules.within_settle_margin(channel, self.policy, view.tip_height, view.mtp):
            raise ChannelError("channel expires too soon to be funded", code="channel_expiring")
        with self._lock:
            current = self.get(channel_id)
            new = rules.accept_funding(current, self.policy, outpoint, status.confirmations)
            return new if new is current else self._commit(new)

    def pay(self, channel_id: str, payment: rules.Payment) -> Channel:
        with self._lock:
            channel = self.get(channel_id)
            view = self.chain_view()
            new = rules.accept_payment(channel, self.policy, payment, view.tip_height, view.mtp)
            if not new.access_started_at:
                new = new.evolve(access_started_at=int(self.clock()))  # the first payment opens access
            return self._commit(new, payment_only=True)

    def note_usage(self, channel_id: str, bytes_used: int, seconds_used: int) -> Channel:
        """The meter's latest reading, kept in memory (it reaches the journal with the next
        payment or state change: no flash write per meter pass)."""
        with self._lock:
            channel = self.get(channel_id)
            if (bytes_used, seconds_used) != (channel.bytes_used, channel.seconds_used):
                channel = channel.evolve(bytes_used=bytes_used, seconds_used=seconds_used)
                self._channels[channel_id] = channel
            return channel

    def close(self, channel_id: str, reason: str = "client_close", wait_for_chain: bool = True) -> Channel:
        """Settle now: sign, persist, broadcast. A broadcast failure leaves the settlement
        pending; watch() rebroadcasts it until it confirms. Without `wait_for_chain` (the owner's
        control plane: one thread serves every call) the fee is the last one estimated and the
        broadcast is left to the next watch() pass."""
        with self._lock:
            channel = self.get(channel_id)
            if channel.phase in (Phase.SETTLING, Phase.SETTLED):
                return channel
            if channel.phase is not Phase.OPEN and channel.phase is not Phase.FUNDING_UNCONFIRMED:
                raise ChannelError(f"channel is {channel.phase.value}", code="channel_not_open")
            if not channel.paid:
                return self._commit(channel.evolve(phase=Phase.EXPIRED, close_reason=f"{reason}_unpaid"))
            feerate = self._feerate() if wait_for_chain else (self._last_feerate or FALLBACK_FEERATE_SAT_VB)
            owed = max(0, min(self.owed(channel), channel.paid))
            tx = rules.build_settlement(channel, self.policy, self.keychain.key(channel.key_index), owed, feerate)
            settling = self._commit(
                channel.evolve(
                    phase=Phase.SETTLING,
                    owed=owed,
                    settlement_txid=c.txid_of(tx),
                    settlement_raw=tx.serialize(),
                    close_reason=reason,
                )
            )
        if wait_for_chain:
            self._broadcast_settlement(settling)
        return settling

    def _feerate(self) -> float:
        try:
            self._last_feerate = self.chain.estimate_feerate()
            return self._last_feerate
        except ChainError:
            return self._last_feerate or FALLBACK_FEERATE_SAT_VB

    def _broadcast_settlement(self, channel: Channel) -> None:
        try:
            self.chain.broadcast(channel.settlement_raw)
            log.info("settlement %s of channel %s broadcast", channel.settlement_txid, channel.id)
        except BroadcastRejected as e:
            log.warning("settlement of channel %s rejected: %s; will retry", channel.id, e)
        except ChainError as e:
            log.warning("settlement of channel %s not broadcast: %s; will retry", channel.id, e)

    # --- chain watch -----------------------------------------------------------------------

    def watch(self) -> None:
        """One pass over every live channel. Safe to call at any time; idempotent."""
        view = self.chain_view(refresh=True)
        if any(ch.phase is Phase.OPEN for ch in self._channels.values()):
            self._feerate()  # kept for closes that cannot wait for the backend
        for channel in self.channels():
            if channel.phase.final:
                continue
            try:
                self._watch_one(channel, view)
            except ChainError as e:
                log.warning("chain watch of channel %s deferred: %s", channel.id, e)

    def _watch_one(self, channel: Channel, view: ChainView) -> None:
        expiring = rules.within_settle_margin(channel, self.policy, view.tip_height, view.mtp)
        if channel.phase is Phase.AWAITING_FUNDING:
            if expiring:
                self._set_phase(channel, Phase.EXPIRED, "never_funded")
            return
        assert channel.funding is not None
        if channel.phase is Phase.SETTLING:
            self._watch_settlement(channel)
            return
        status = self.chain.get_tx(channel.funding.txid)
        if status is None:
            # Funding dropped from mempool and chain: double-spent. Stop accepting now.
            self._set_phase(channel, Phase.FAILED, "funding_double_spent")
            return
        if self._spent_elsewhere(channel):
            return
        if channel.phase is Phase.FUNDING_UNCONFIRMED and rules.funding_usable(
            self.policy, channel.deposit, status.confirmations
        ):
            with self._lock:
                channel = self._commit(self.get(channel.id).evolve(
                    phase=Phase.OPEN, funding_confirmations=status.confirmations))
        else:
            self._note_confirmations(channel, status)
        if expiring and channel.phase is Phase.OPEN:
            log.info("channel %s reached its settlement margin; settling", channel.id)
            self.close(channel.id, reason="expiry_margin")

    def _note_confirmations(self, channel: Channel, status: TxStatus) -> None:
        # Kept in memory only: the depth is re-read from the chain, flash is not worn by it.
        with self._lock:
            current = self._channels.get(channel.id)
            if current is not None and current.phase is channel.phase:
                self._channels[channel.id] = current.evolve(funding_confirmations=status.confirmations)

    def _spent_elsewhere(self, channel: Channel) -> bool:
        assert channel.funding is not None
        spend = self.chain.get_outspend(channel.funding.txid, channel.funding.vout)
        if spend.spent and spend.spending_txid != channel.settlement_txid:
            self._set_phase(channel, Phase.CLOSED_ELSEWHERE, "funding_spent_by_other_tx")
            return True
        return False

    def _watch_settlement(self, channel: Channel) -> None:
        status = self.chain.get_tx(channel.settlement_txid or "")
        if status is None:
            if self._spent_elsewhere(channel):
                return
            self._broadcast_settlement(channel)
        elif status.confirmations >= 1:
            self._set_phase(channel, Phase.SETTLED, channel.close_reason)

    def _set_phase(self, channel: Channel, phase: Phase, reason: str) -> None:
        with self._lock:
            current = self.get(channel.id)
            if current.phase is channel.phase:
                self._commit(current.evolve(phase=phase, close_reason=reason))
                log.info("channel %s: %s -> %s (%s)", channel.id, channel.phase.value, phase.value, reason)
