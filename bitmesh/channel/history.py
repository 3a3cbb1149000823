"""Final channels once they leave the live journal: their archive records and what is kept of
them in memory.

A final channel that carried money (paid > 0) is appended to the archive file at a compaction
and dropped from the live journal; one that never carried any is just dropped. The archive is
read once at start, streamed; memory keeps only the totals (earnings) and the newest channels
(`KEEP_RECENT` by creation for the control plane's channel list, `KEEP_SETTLEMENTS` by last
change for its recent settlements), so neither memory nor the live journal grows with history.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field

from bitcoin.core import CTransaction

from bitmesh.chain.address import p2wpkh_script
from bitmesh.channel.state import Channel, Phase

KEEP_RECENT = 200  # what `ubus call bitmesh channels` lists (control.CHANNELS_LISTED)
KEEP_SETTLEMENTS = 20  # control.RECENT_SETTLEMENTS
# Money is done: the chain holds the transactions; the archive keeps what the owner reads.
_DROPPED = ("payment_sig", "settlement_raw", "bumps", "payout_raw")
# Fields at their default are left out of an archive record (Channel.from_record restores them).
_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
             for f in dataclasses.fields(Channel)
             if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def payout_of(channel: Channel) -> int:
    """What the owner gets: the payout to its address once the router has built it (the hold
    output moved on, or the last fee bump's child, which pays the owner directly); before that,
    the owner's output of the settlement (the router's hold output, less the payout's fee to come)."""
    if channel.payout_raw:
        return sum(o.nValue for o in CTransaction.deserialize(channel.payout_raw).vout)
    if not channel.settlement_raw:
        return 0
    tx = CTransaction.deserialize(channel.settlement_raw)
    return sum(o.nValue for o in tx.vout if bytes(o.scriptPubKey) != channel.refund_script)


def at_rest(channel: Channel) -> bool:
    """Nothing left to watch or broadcast: final, and when the settlement pays the router's hold
    output (P2WPKH of the server key), the payout moving it to the owner confirmed. Only such a
    channel leaves the live journal."""
    if not channel.phase.final:
        return False
    if channel.phase is Phase.SETTLED and not channel.payout_confirmed and channel.settlement_raw:
        hold = p2wpkh_script(channel.server_pubkey)
        return all(bytes(o.scriptPubKey) != hold for o in CTransaction.deserialize(channel.settlement_raw).vout)
    return True


def archivable(channel: Channel) -> bool:
    """Kept in the archive once at rest: it carried money. One never paid (an open never
    funded, a funded one closed unpaid) is dropped: the client refunds itself."""
    return at_rest(channel) and channel.paid > 0


@dataclass(frozen=True)
class Archived:
    channel: Channel
    payout: int  # to the owner, read off the settlement before it was dropped


def archive_record(item: Archived) -> dict:
    ch = item.channel
    rec = {name: value for name, value in ch.to_record().items()
           if name not in _DROPPED and (name not in _DEFAULTS or getattr(ch, name) != _DEFAULTS[name])}
    return {"t": "arch", "c": rec, "payout": item.payout}


def archived_from_record(record: dict) -> Archived:
    return Archived(Channel.from_record(record["c"]), int(record.get("payout", 0)))


@dataclass(frozen=True)
class History:
    """An immutable snapshot: the ledger swaps in a new one after each compaction."""

    channels: int = 0  # archived channels
    settled_channels: int = 0
    settled_sat: int = 0
    recent: tuple[Archived, ...] = ()  # newest first, by created_at
    settlements: tuple[Archived, ...] = ()  # settled, newest first, by updated_at
    last_batch: frozenset[str] = frozenset()  # archived by the latest compaction
    _by_id: dict[str, Channel] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id.update((a.channel.id, a.channel) for a in self.recent)

    def get(self, channel_id: str) -> Channel | None:
        """A recently archived channel (older ones are in the archive file only)."""
        return self._by_id.get(channel_id)

    def plus(self, batch: list[Archived]) -> History:
        builder = HistoryBuilder.from_history(self)
        for item in batch:
            builder.add(item)
        return builder.build(last_batch=frozenset(a.channel.id for a in batch))


class HistoryBuilder:
    """Totals and the newest channels over a stream of archive records, in bounded memory."""

    def __init__(self) -> None:
        self.channels = self.settled_channels = self.settled_sat = 0
        self._recent: list[tuple[int, str, int, Archived]] = []  # min-heaps of the newest
        self._settlements: list[tuple[int, str, int, Archived]] = []
        self._n = 0  # tie-breaker: entries never compare their Archived

    @classmethod
    def from_history(cls, history: History) -> HistoryBuilder:
        b = cls()
        b.channels, b.settled_channels, b.settled_sat = history.channels, history.settled_channels, history.settled_sat
        for a in history.recent:
            b._push(b._recent, a.channel.created_at, a, KEEP_RECENT)
        for a in history.settlements:
            b._push(b._settlements, a.channel.updated_at, a, KEEP_SETTLEMENTS)
        return b

    def add(self, item: Archived) -> None:
        ch = item.channel
        self.channels += 1
        self._push(self._recent, ch.created_at, item, KEEP_RECENT)
        if ch.phase is Phase.SETTLED:
            self.settled_channels += 1
            self.settled_sat += item.payout
            self._push(self._settlements, ch.updated_at, item, KEEP_SETTLEMENTS)

    def _push(self, heap: list, key: int, item: Archived, limit: int) -> None:
        self._n += 1
        entry = (key, item.channel.id, self._n, item)
        if len(heap) < limit:
            heapq.heappush(heap, entry)
        elif entry[:2] > heap[0][:2]:
            heapq.heapreplace(heap, entry)

    def build(self, last_batch: frozenset[str] = frozenset()) -> History:
        return History(self.channels, self.settled_channels, self.settled_sat, _newest(self._recent),
                       _newest(self._settlements), last_batch)


def _newest(heap: list[tuple[int, str, int, Archived]]) -> tuple[Archived, ...]:
    return tuple(entry[3] for entry in sorted(heap, key=lambda e: e[:3], reverse=True))
