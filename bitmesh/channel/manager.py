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
from dataclasses import dataclass, field

from bitcoin.core import CTransaction, b2lx

from bitmesh.chain.base import FALLBACK_FEERATE_SAT_VB, ChainBackend, TxStatus
from bitmesh.channel import contract as c
from bitmesh.channel import feebump
from bitmesh.channel import server as rules
from bitmesh.channel.history import History
from bitmesh.channel.keys import ChannelKeychain
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.state import Channel, Phase
from bitmesh.channel.wire import FundingRequest, OpenRequest
from bitmesh.errors import ChainError, ChannelError
from bitmesh.tariff import Tariff, clock_origin

log = logging.getLogger(__name__)

Listener = Callable[[Channel, Channel | None], None]  # (new, previous)


@dataclass(frozen=True)
class ChainView:
    tip_height: int
    mtp: int
    taken_at: float = 0.0  # clock() when the backend answered
    seen_at: float = field(default_factory=time.monotonic)  # the same, monotonic: for its age


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
        # A close stops the device's traffic before its final read (`freeze`: the meter) and
        # gives it back if the close fails (`thaw`); by default there is nothing to stop.
        self.freeze: Callable[[Channel], None] = lambda ch: None
        self.thaw: Callable[[Channel], None] = lambda ch: None
        self.listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._channels: dict[str, Channel] = ledger.load()
        # Keys continue above the durable mark: an index handed out before a crash is never reused.
        self._next_key_index = ledger.key_mark
        for ch in self._channels.values():
            if not ch.phase.final:
                keychain.channel_key(ch.key_index, ch.server_pubkey)  # a wrong seed stops the start
        self._view: ChainView | None = None
        self.chain_error: str | None = None  # why the last chain refresh failed; None after a success
        self._last_feerate: float | None = None
        # Chain-watch memory (never on flash): suspect fundings, funding bytes seen (to prove a
        # double spend or hand a forgotten funding back), when each settlement's rate was set.
        self._suspects: dict[str, _Suspect] = {}
        self._funding_raw: dict[str, bytes] = {}
        self._rate_since: dict[str, tuple[int, int]] = {}

    # --- reading ---------------------------------------------------------------------------

    def get(self, channel_id: str) -> Channel:
        """A live channel, or a recently archived one (read only)."""
        channel = self._channels.get(channel_id) or self.ledger.history.get(channel_id)
        if channel is None:
            raise ChannelError(f"no channel {channel_id!r}", code="channel_unknown", http_status=404)
        return channel

    def channels(self) -> list[Channel]:
        """The live channels: final ones leave at the journal's next compaction (`history`)."""
        return list(self._channels.values())

    @property
    def history(self) -> History:
        """Final channels that left the live journal: totals and the newest (an immutable snapshot)."""
        return self.ledger.history

    def chain_view(self, refresh: bool = False) -> ChainView:
        if refresh or self._view is None:
            try:
                self._view = ChainView(self.chain.tip_height(), self.chain.median_time_past(), self.clock(),
                                       time.monotonic())
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

    def _commit(self, new: Channel, payment_only: bool = False,
                deferred: list[tuple[Channel, Channel | None]] | None = None) -> Channel:
        """Persist, then publish. Call with the lock held. A channel is on disk from its funding
        on; an open lives in memory until then and, if it ends unfunded, leaves no record at all
        (its key index was reserved by open_channel). A StorageError (storage_full ...) changes
        nothing: the change is refused and never acknowledged. With `deferred`, the listeners are
        left to the caller (`_publish` once the lock is released)."""
        new = new.evolve(updated_at=int(self.clock()))
        old = self._channels.get(new.id)
        if old is None and self.ledger.history.get(new.id) is not None:
            raise ChannelError(f"channel {new.id} is archived", code="channel_not_open")
        if new.funding is not None or self.ledger.holds(new.id):
            if payment_only:
                self.ledger.put_payment(new)
            else:
                self.ledger.put(new)
            self._channels[new.id] = new
        elif new.phase.final:
            self._channels.pop(new.id, None)  # never funded: nothing to keep
        else:
            self._channels[new.id] = new
        for gone in self.ledger.drain_evicted():  # archived or dropped by a compaction
            self._channels.pop(gone, None)
        if deferred is not None:
            deferred.append((new, old))
        else:
            self._publish(new, old)
        return new

    def _publish(self, new: Channel, old: Channel | None) -> None:
        for listener in self.listeners:
            try:
                listener(new, old)
            except Exception:  # a listener must never undo a persisted payment
                log.exception("channel listener failed")

    def open_channel(self, req: OpenRequest, client_mac: str = "", client_ip: str = "") -> Channel:
        """New channel terms; the session is bound to the caller's MAC and IP (the portal
        finds them), which is where access will be granted once it pays."""
        policy = self.policy  # one snapshot: the price checked is the price recorded (demand pricing)
        rules.check_selling(policy)  # uplink mode: not while the upstream credit cannot be kept ahead
        rules.check_deposit(policy, req.deposit)
        if req.tariff is not None and req.tariff != (policy.sat_per_mb, policy.sat_per_minute):
            raise ChannelError(f"the price changed since the offer: now {policy.sat_per_mb} sat/MB, "
                               f"{policy.sat_per_minute} sat/min (GET /api/offer again)", code="price_changed")
        view = self.chain_view(refresh=True)
        with self._lock:
            index = self._next_key_index
            # On disk before the key is handed out: never reused after a crash (storage_full
            # refuses the open). The open itself is not written until it is funded (_commit).
            self.ledger.reserve_key(index)
            server_key = self.keychain.key(index)
            channel = Channel(
                id=secrets.token_hex(16),
                key_index=index,
                client_pubkey=req.client_pubkey,
                server_pubkey=bytes(server_key.pub),
                deposit=req.deposit,
                expiry=view.tip_height + policy.expiry_blocks,
                refund_script=req.refund_script,
                created_at=int(self.clock()),
                client_mac=client_mac,
                client_ip=client_ip,
                sat_per_mb=policy.sat_per_mb,
                sat_per_minute=policy.sat_per_minute,
            )
            self._next_key_index = index + 1
            return self._commit(channel)

    def submit_funding(self, channel_id: str, req: FundingRequest) -> Channel:
        channel = self.get(channel_id)
        if channel.phase is not Phase.AWAITING_FUNDING:
            if req.outpoint and channel.funding == req.outpoint:
                return channel
            raise ChannelError(f"channel is {channel.phase.value}", code="channel_already_funded")
        if req.tx is not None:
            funding_tx = req.tx
            outpoint = rules.find_funding_output(channel, req.tx, req.outpoint.vout if req.outpoint else None)
            self.chain.broadcast(req.tx.serialize())
            status = self.chain.get_tx(outpoint.txid)
        else:
            assert req.outpoint is not None
            outpoint = req.outpoint
            status = self.chain.get_tx(outpoint.txid)
            if status is None:
                raise ChannelError("funding transaction not found", code="funding_not_found", http_status=404)
            funding_tx = rules.backend_tx(status.raw, outpoint.txid)  # the bytes must be that txid
            rules.find_funding_output(channel, funding_tx, outpoint.vout)
        if status is None:
            raise ChannelError("funding transaction vanished after broadcast", code="funding_not_found")
        # The output must still be there to be spent by the contract.
        if self.chain.get_outspend(outpoint.txid, outpoint.vout).spent:
            raise ChannelError("funding output is already spent", code="funding_double_spent")
        view = self.chain_view(refresh=True)
        if rules.within_settle_margin(channel, self.policy, view.tip_height, view.mtp):
            raise ChannelError("channel expires too soon to be funded", code="channel_expiring")
        unconfirmed = status.confirmations < self.policy.min_conf
        # 0-conf is judged here, once: the caps first (cheap), then the funding itself when it is
        # still in the mempool (replaceability, feerate, unconfirmed ancestors: backend look-ups).
        wait_reason = rules.zero_conf_cap_refusal(self.policy, channel.deposit, 0) if unconfirmed else None
        if unconfirmed and wait_reason is None and status.confirmations == 0:

            def lookup(txid: str):
                found = self.chain.get_tx(txid)
                if found is None:
                    return None
                try:
                    return rules.backend_tx(found.raw, txid), found.confirmations
                except ChannelError as e:
                    log.warning("funding ancestor %s: %s", txid, e)
                    return None

            target = rules.zero_conf_target_blocks(channel, self.policy, view.tip_height)
            min_feerate = max(rules.ZERO_CONF_MIN_FEERATE_SAT_VB, self.chain.estimate_feerate(target))
            wait_reason = rules.funding_risk_refusal(funding_tx, lookup, min_feerate)
        self._funding_raw[channel_id] = funding_tx.serialize()  # chain watch: double-spend proof, rebroadcast
        with self._lock:
            current = self.get(channel_id)
            if unconfirmed and wait_reason is None:  # the total, under the lock: fundings race
                in_use = rules.zero_conf_in_use(self.policy, self._channels.values(), channel_id)
                wait_reason = rules.zero_conf_cap_refusal(self.policy, current.deposit, in_use)
            new = rules.accept_funding(current, self.policy, outpoint, status.confirmations, wait_reason)
            if new is current:
                return current
            if new.phase is Phase.FUNDING_UNCONFIRMED:
                log.info("channel %s waits for %d confirmation(s): %s", channel_id, self.policy.min_conf,
                         wait_reason or "")
            return self._commit(new)

    def pay(self, channel_id: str, payment: rules.Payment) -> Channel:
        """Accept a payment: on disk (fsync) under the lock, then published (the kernel grant) once
        the lock is released: a grant is an nft call, and under 200 devices' payments the lock
        would be held through one after another while opens, fundings, closes and the chain watch
        wait. Still before the answer: the grant follows the journal, the answer follows both. The
        meter grants from the channel as it is when its turn comes, so a late grant never lowers
        a newer one, nor re-grants a channel closed meanwhile."""
        published: list[tuple[Channel, Channel | None]] = []
        with self._lock:
            channel = self.get(channel_id)
            view = self.chain_view()
            age = self._view_age(view)
            if age > self.policy.chain_stale_seconds:  # the tip may be past any margin by now
                raise ChannelError(f"the router has not seen the chain for {age:.0f} s: it counts as inside the "
                                   "settlement margin, no payments are taken", code="channel_expiring")
            if channel_id in self._suspects:
                raise ChannelError("the chain backend does not show this channel's funding unspent right now; "
                                   "payments wait until it does", code="funding_not_found")
            new = rules.accept_payment(channel, self.policy, payment, view.tip_height, view.mtp)
            new = new.evolve(access_started_at=clock_origin(channel, int(self.clock())))  # time without credit is free
            new = self._commit(new, payment_only=True, deferred=published)
        for change in published:
            self._publish(*change)
        return new

    def note_usage(self, channel_id: str, bytes_used: int, seconds_used: int) -> Channel:
        """The meter's latest reading, kept in memory (it reaches the journal with the next
        payment or state change: no flash write per meter pass)."""
        with self._lock:
            channel = self.get(channel_id)
            # A meter pass's read may predate a close's final one: never below it, never after it.
            if channel.owed is not None or channel_id not in self._channels:
                return channel
            bytes_used, seconds_used = max(bytes_used, channel.bytes_used), max(seconds_used, channel.seconds_used)
            if (bytes_used, seconds_used) != (channel.bytes_used, channel.seconds_used):
                channel = channel.evolve(bytes_used=bytes_used, seconds_used=seconds_used)
                self._channels[channel_id] = channel
            return channel

    def close(self, channel_id: str, reason: str = "client_close", wait_for_chain: bool = True) -> Channel:
        """Settle now: sign, persist, broadcast. A broadcast failure leaves the settlement
        pending; watch() rebroadcasts it (and raises its fee) until it confirms. Without
        `wait_for_chain` (the owner's control plane, or a blind watch pass) the fee is the last
        one estimated and the broadcast is left to the next watch() pass. A settlement whose
        fee the owner's share cannot pay ends the channel `uneconomic` (docs/protocol.md 3.4)."""
        with self._lock:
            channel = self.get(channel_id)
            if channel.phase in (Phase.SETTLING, Phase.SETTLED):
                return channel
            if channel.phase is not Phase.OPEN and channel.phase is not Phase.FUNDING_UNCONFIRMED:
                raise ChannelError(f"channel is {channel.phase.value}", code="channel_not_open")
            if not channel.paid:
                return self._commit(channel.evolve(phase=Phase.EXPIRED, close_reason=f"{reason}_unpaid"))
            view = self._view
            left = feebump.blocks_left(channel.expiry, view.tip_height, view.mtp) if view else feebump.MAX_TARGET_BLOCKS
            target = feebump.target_blocks(left)
            feerate = self._feerate(target) if wait_for_chain else (self._last_feerate or FALLBACK_FEERATE_SAT_VB)
            # Traffic stops before the final read: what passes between the read and the revoke
            # (signing, the journal's fsync, the listeners) would otherwise never be billed.
            self.freeze(channel)
            try:
                owed = max(0, min(self._owed(channel), channel.paid))
                channel = self.get(channel_id)  # with the usage the meter just read: the record shows what owed bills
                key = self.keychain.channel_key(channel.key_index, channel.server_pubkey)  # a wrong seed: refused
                try:
                    tx = rules.build_settlement(channel, self.policy, key, owed, feerate)
                except ChannelError as e:
                    if e.code != "settlement_uneconomic":
                        raise
                    log.warning("channel %s: %s; not settled at a loss: the client takes its deposit back with "
                                "its refund after the expiry", channel.id, e.message)
                    return self._commit(channel.evolve(phase=Phase.UNECONOMIC, owed=owed, close_reason=reason))
                settling = self._commit(
                    channel.evolve(
                        phase=Phase.SETTLING,
                        owed=owed,
                        settlement_txid=c.txid_of(tx),
                        settlement_raw=tx.serialize(),
                        close_reason=reason,
                    )
                )
            except BaseException:
                self.thaw(channel)  # not closed (storage_full, seed_mismatch ...): still open, its access back
                raise
        if wait_for_chain:
            self._broadcast_settlement(settling)
        return settling

    def _owed(self, channel: Channel) -> int:
        """The meter's figure; if the meter fails (an nft error), the bill for the usage it
        recorded at its last pass (never more than the client used: the owner carries the gap)."""
        try:
            return self.owed(channel)
        except Exception:
            log.exception("channel %s: the meter failed at settlement; billing the usage it last recorded", channel.id)
        if not channel.access_started_at:
            return 0
        if not (channel.sat_per_mb or channel.sat_per_minute):
            return channel.paid
        return min(channel.paid, Tariff(channel.sat_per_mb, channel.sat_per_minute).owed(
            channel.bytes_used, channel.seconds_used))

    def _feerate(self, target_blocks: int = feebump.MAX_TARGET_BLOCKS) -> float:
        """The backend's estimate for `target_blocks`; during an outage the last one it gave
        (never a made-up number when one was seen: bumps correct it once the backend is back)."""
        try:
            self._last_feerate = self.chain.fee_estimate(target_blocks)
            return self._last_feerate
        except ChainError:
            return self._last_feerate or FALLBACK_FEERATE_SAT_VB

    def _broadcast_settlement(self, channel: Channel) -> None:
        """The settlement, then its fee bumps in order (each child needs its parent)."""
        for raw in (channel.settlement_raw, *channel.bumps):
            try:
                self.chain.broadcast(raw)
            except ChainError as e:
                log.warning("settlement of channel %s: %s not broadcast: %s; will retry", channel.id,
                            c.txid_of(CTransaction.deserialize(raw)), e)
                return
        log.info("settlement %s of channel %s broadcast (%d fee bumps)", channel.settlement_txid, channel.id,
                 len(channel.bumps))

    # --- chain watch -----------------------------------------------------------------------
    #
    # Beyond the happy path: one channel's failure never stops the others; a single "not found"
    # or "spent elsewhere" is not proof (_watch_funding); a settlement is fee-bumped while
    # unconfirmed, against the blocks left before the refund is valid (_bump); a stale chain
    # view counts as inside the margin (_settle_blind, pay()).

    def _view_age(self, view: ChainView | None = None) -> float:
        view = view or self._view
        return float("inf") if view is None else max(0.0, time.monotonic() - view.seen_at)

    def _expiring(self, channel: Channel, view: ChainView) -> bool:
        return rules.within_settle_margin(channel, self.policy, view.tip_height, view.mtp, self._view_age(view))

    def watch(self) -> None:
        """One pass over every live channel. Safe to call at any time; idempotent. Raises
        ChainError when the backend does not answer (after settling what a stale view makes due)."""
        try:
            view = self.chain_view(refresh=True)
        except ChainError:
            self._settle_blind()
            raise
        for channel in self.channels():
            if channel.phase.final and not _payout_pending(channel):
                continue
            try:
                self._watch_one(channel, view)
            except ChainError as e:
                log.warning("chain watch of channel %s deferred: %s", channel.id, e)
            except Exception:  # a bug or an nft error in one channel must not leave the others unsettled
                log.exception("chain watch of channel %s failed; the other channels go on", channel.id)

    def _settle_blind(self) -> None:
        """The backend is down and the last view is stale: the tip may be past any margin, so
        every paid open channel is settled now (signed and on disk; broadcast when it is back)."""
        if self._view_age() <= self.policy.chain_stale_seconds:
            return
        for channel in self.channels():
            if channel.phase is not Phase.OPEN or not channel.paid:
                continue
            try:
                log.warning("channel %s: no chain view for %.0f s; settling it", channel.id, self._view_age())
                self.close(channel.id, reason="chain_stale", wait_for_chain=False)
            except Exception:
                log.exception("blind settlement of channel %s failed; the other channels go on", channel.id)

    def _watch_one(self, channel: Channel, view: ChainView) -> None:
        if channel.phase is Phase.SETTLED:
            self._watch_payout(channel)
            return
        expiring = self._expiring(channel, view)
        if channel.phase is Phase.AWAITING_FUNDING:
            if expiring:
                self._set_phase(channel, Phase.EXPIRED, "never_funded")
            return
        assert channel.funding is not None
        if channel.phase is Phase.SETTLING:
            self._watch_settlement(channel, view)
            return
        status = self._watch_funding(channel, view)
        if status is False:
            return  # final now
        if status is not None:
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

    def _watch_funding(self, channel: Channel, view: ChainView) -> TxStatus | None | bool:
        """The funding's status when it is there and unspent; None while it is suspect (not
        found, or spent by a transaction that cannot be proven: no payments, keep watching);
        False when the channel was made final on proof."""
        assert channel.funding is not None
        status = self.chain.get_tx(channel.funding.txid)
        if status is None:
            if self._double_spend_proven(channel):
                self._set_phase(channel, Phase.FAILED, "funding_double_spent")
                return False
            self._suspect(channel, view, "the backend does not find the funding")
            self._rebroadcast_funding(channel)
            if self._suspect_final(channel, view):
                self._set_phase(channel, Phase.FAILED, "funding_vanished")
                return False
            return None
        self._funding_raw.setdefault(channel.id, status.raw)
        spend = self.chain.get_outspend(channel.funding.txid, channel.funding.vout)
        if spend.spent:
            # Before the expiry only the router's signature spends the contract, and it signed
            # nothing: a spend then is a wrong answer. After it, a confirmed spend is the refund.
            if spend.confirmations >= 1 and _refund_possible(channel, view):
                self._set_phase(channel, Phase.CLOSED_ELSEWHERE, "funding_spent_by_other_tx")
                return False
            self._suspect(channel, view, f"the backend says the funding is spent by {spend.spending_txid or 'a tx'} "
                                         f"({spend.confirmations} conf)")
            if self._suspect_final(channel, view):
                self._set_phase(channel, Phase.CLOSED_ELSEWHERE, "funding_spent_by_other_tx")
                return False
            return None
        self._clear_suspect(channel)
        return status

    def _suspect(self, channel: Channel, view: ChainView, why: str) -> None:
        entry = self._suspects.get(channel.id)
        if entry is None:
            log.warning("channel %s: %s; payments wait, the channel is watched on", channel.id, why)
            entry = self._suspects[channel.id] = _Suspect(view.tip_height)
        entry.passes += 1

    def _clear_suspect(self, channel: Channel) -> None:
        if self._suspects.pop(channel.id, None) is not None:
            log.info("channel %s: the funding is back", channel.id)

    def _suspect_final(self, channel: Channel, view: ChainView) -> bool:
        """Without proof, N consistent observations: SUSPECT_PASSES passes in a row spanning
        SUSPECT_BLOCKS blocks, once the refund path is open (before it the router can still
        settle whenever the funding answers again, so nothing is gained by giving up)."""
        entry = self._suspects.get(channel.id)
        return (entry is not None and entry.passes >= SUSPECT_PASSES
                and view.tip_height - entry.since_height >= SUSPECT_BLOCKS and _refund_possible(channel, view))

    def _double_spend_proven(self, channel: Channel) -> bool:
        """A funding never seen confirmed is gone for good when one of its inputs is spent, in
        a block, by another transaction (the funding itself is not in the chain: it was never
        seen confirmed, and a confirmed funding is never judged here)."""
        raw = self._funding_raw.get(channel.id)
        if raw is None or channel.funding_confirmations >= 1 or channel.funding is None:
            return False
        for txin in CTransaction.deserialize(raw).vin:
            spend = self.chain.get_outspend(b2lx(txin.prevout.hash), txin.prevout.n)
            if spend.spent and spend.confirmations >= 1 and spend.spending_txid != channel.funding.txid:
                return True
        return False

    def _rebroadcast_funding(self, channel: Channel) -> None:
        """A node restarted without its mempool forgets a 0-conf funding: hand it back."""
        raw = self._funding_raw.get(channel.id)
        if raw is None:
            return
        try:
            self.chain.broadcast(raw)
            log.info("channel %s: funding rebroadcast", channel.id)
        except ChainError as e:
            log.info("channel %s: funding rebroadcast refused: %s", channel.id, e)

    def _note_confirmations(self, channel: Channel, status: TxStatus) -> None:
        # Kept in memory only: the depth is re-read from the chain, flash is not worn by it.
        with self._lock:
            current = self._channels.get(channel.id)
            if current is not None and current.phase is channel.phase:
                self._channels[channel.id] = current.evolve(funding_confirmations=status.confirmations)

    def _watch_settlement(self, channel: Channel, view: ChainView) -> None:
        assert channel.funding is not None
        status = self.chain.get_tx(channel.settlement_txid or "")
        if status is not None and status.confirmations >= 1:
            self._clear_suspect(channel)
            self._settled(channel)
            return
        if status is None:
            spend = self.chain.get_outspend(channel.funding.txid, channel.funding.vout)
            if spend.spent and spend.spending_txid != channel.settlement_txid:
                if spend.confirmations >= 1 and _refund_possible(channel, view) and (
                        spend.spending_txid is not None or self._suspect_final(channel, view)):
                    self._set_phase(channel, Phase.CLOSED_ELSEWHERE, "funding_spent_by_other_tx")
                    return
                self._suspect(channel, view, "the funding is spent and the settlement not found")
        self._broadcast_settlement(channel)
        self._bump(self.get(channel.id), view)

    # --- fee bumps (CPFP through the router's hold output) -----------------------------------

    def _hold_tip(self, channel: Channel) -> tuple[c.Outpoint, int] | None:
        """The router's output at the end of the settlement's chain (the settlement's hold
        output, or the last bump's), and its value; None for a settlement without one."""
        settlement = CTransaction.deserialize(channel.settlement_raw)
        hold = c.hold_script(channel.server_pubkey)
        index = next((i for i, out in enumerate(settlement.vout) if bytes(out.scriptPubKey) == hold), None)
        if index is None:
            return None
        tip = (c.Outpoint(c.txid_of(settlement), index), settlement.vout[index].nValue)
        for raw in channel.bumps:
            child = CTransaction.deserialize(raw)
            if bytes(child.vout[0].scriptPubKey) != hold:
                return None  # the last bump paid the owner out: nothing left to bump with
            tip = (c.Outpoint(c.txid_of(child), 0), child.vout[0].nValue)
        return tip

    def _package(self, channel: Channel) -> feebump.Package:
        settlement = CTransaction.deserialize(channel.settlement_raw)
        fee = channel.deposit - sum(out.nValue for out in settlement.vout)
        size = c.tx_vsize(settlement)
        hold = c.hold_script(channel.server_pubkey)
        value = next((o.nValue for o in settlement.vout if bytes(o.scriptPubKey) == hold), 0)
        for raw in channel.bumps:
            child = CTransaction.deserialize(raw)
            fee += value - child.vout[0].nValue
            value = child.vout[0].nValue
            size += c.tx_vsize(child)
        return feebump.Package(fee, size)

    def _bump(self, channel: Channel, view: ChainView) -> None:
        """Raise the unconfirmed settlement's fee when it pays less than it takes to confirm
        within the target (a third of the blocks left), from the owner's share, by one more
        CPFP child. Never spends the hold output below dust."""
        if channel.phase is not Phase.SETTLING or self._view_age(view) > self.policy.chain_stale_seconds:
            return
        tip = self._hold_tip(channel)
        left = feebump.blocks_left(channel.expiry, view.tip_height, view.mtp)
        if tip is None or left == 0:
            return
        outpoint, value = tip
        package = self._package(channel)
        since = self._rate_since.setdefault(channel.id, (view.tip_height, len(channel.bumps)))
        sat = since[1] == len(channel.bumps) and view.tip_height > since[0]
        estimate = self._feerate(feebump.target_blocks(left))
        needed = feebump.needed_feerate(estimate, package, left, sat)
        hold = c.hold_script(channel.server_pubkey)
        fee = feebump.child_fee(package, c.hold_spend_vsize(hold), needed, value - c.DUST_LIMIT_SAT)
        if fee is None:
            return
        key = self.keychain.channel_key(channel.key_index, channel.server_pubkey)
        # What is left must still pay its own way to the payout address; if it cannot, this
        # last bump pays the owner out itself (no dust stranded on the router's key).
        to = hold
        if value - fee - c.fee_for(estimate, c.hold_spend_vsize(self.policy.payout_script)) < c.DUST_LIMIT_SAT:
            to = self.policy.payout_script
        child = c.hold_spend_tx(key, outpoint, value, to, fee)
        with self._lock:
            current = self.get(channel.id)
            if current.phase is not Phase.SETTLING or current.bumps != channel.bumps:
                return
            bumped = self._commit(current.evolve(bumps=(*current.bumps, child.serialize())))
        self._rate_since[channel.id] = (view.tip_height, len(bumped.bumps))
        log.info("channel %s: settlement %s bumped from %.1f to %.1f sat/vB (%d blocks left): child %s pays %d sat",
                 channel.id, channel.settlement_txid, package.feerate, needed, left, c.txid_of(child), fee)
        self._broadcast_settlement(bumped)

    # --- payout: the owner's share moved on from the hold output --------------------------

    def _settled(self, channel: Channel) -> None:
        """The settlement confirmed: the client's refund can no longer take the owner's share.
        It is moved from the router's hold output to the owner's payout address, at the fee the
        backend estimates (no deadline any more)."""
        tip = self._hold_tip(channel)
        payout = b""
        if tip is None and channel.bumps:
            payout = channel.bumps[-1]  # the last bump paid the owner out
        elif tip is not None:
            outpoint, value = tip
            fee = c.fee_for(self._feerate(), c.hold_spend_vsize(self.policy.payout_script))
            if value - fee >= c.DUST_LIMIT_SAT:
                key = self.keychain.channel_key(channel.key_index, channel.server_pubkey)
                payout = c.hold_spend_tx(key, outpoint, value, self.policy.payout_script, fee).serialize()
            else:
                log.warning("channel %s: the hold output of %d sat does not pay its way out at %d sat fee",
                            channel.id, value, fee)
        with self._lock:
            current = self.get(channel.id)
            if current.phase is not channel.phase:
                return
            settled = self._commit(current.evolve(
                phase=Phase.SETTLED, payout_raw=payout, payout_confirmed=not payout,
                payout_txid=c.txid_of(CTransaction.deserialize(payout)) if payout else None))
        self._rate_since.pop(channel.id, None)
        log.info("channel %s: settling -> settled (%s)", channel.id, channel.close_reason)
        if payout:
            self._watch_payout(settled)

    def _watch_payout(self, channel: Channel) -> None:
        if not _payout_pending(channel):
            return
        status = self.chain.get_tx(channel.payout_txid or "")
        if status is not None and status.confirmations >= 1:
            with self._lock:
                current = self.get(channel.id)
                if _payout_pending(current):
                    self._commit(current.evolve(payout_confirmed=True))
            log.info("channel %s: payout %s to the owner confirmed", channel.id, channel.payout_txid)
            return
        for raw in (*channel.bumps, channel.payout_raw):
            try:
                self.chain.broadcast(raw)
            except ChainError as e:
                log.warning("payout of channel %s not broadcast: %s; will retry", channel.id, e)
                return

    def _set_phase(self, channel: Channel, phase: Phase, reason: str) -> None:
        with self._lock:
            current = self.get(channel.id)
            if current.phase is channel.phase:
                self._commit(current.evolve(phase=phase, close_reason=reason))
                log.info("channel %s: %s -> %s (%s)", channel.id, channel.phase.value, phase.value, reason)
        self._suspects.pop(channel.id, None)


SUSPECT_PASSES = 3
SUSPECT_BLOCKS = 6


@dataclass
class _Suspect:
    since_height: int
    passes: int = 0


def _payout_pending(channel: Channel) -> bool:
    return channel.phase is Phase.SETTLED and bool(channel.payout_raw) and not channel.payout_confirmed


def _refund_possible(channel: Channel, view: ChainView) -> bool:
    """Whether the client's refund can be in the chain: the tip has reached the expiry."""
    if channel.contract.expiry_is_time:
        return view.mtp >= channel.expiry
    return view.tip_height >= channel.expiry
