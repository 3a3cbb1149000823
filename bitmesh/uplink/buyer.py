"""The uplink buyer's decisions, pure: when to prepay upstream and how much, how much budget is
left, when to open the next uplink channel, when to stop selling and when to cut, what to charge.

The router resells what it buys: its own clients' traffic is the traffic the upstream router
meters. So the upstream credit (paid minus what the upstream says is owed) must stay ahead of
what the clients use; it is topped up a prepay step at a time, never beyond the payer rule
(owed + one step, bitmesh.channel.payer) and never beyond the owner's budget.

The budget counts what the upstream router can claim: every amount ever signed to it (a signed
payment is the router's to settle, acknowledged or not). `Book.committed` is that figure; it is
on disk before a payment leaves (bitmesh.uplink.store), so no restart can spend past the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from bitmesh.channel.contract import DUST_LIMIT_SAT
from bitmesh.tariff import Tariff

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from collections.abc import Iterable

# Why the reseller does not sell (stable codes: the offer, ubus and the refusal of an open carry them)
BUDGET_SPENT = "uplink_budget_spent"
WALLET_EMPTY = "uplink_wallet_empty"
UPSTREAM_UNREACHABLE = "uplink_unreachable"
NO_CHANNEL = "uplink_not_ready"


@dataclass(frozen=True)
class UplinkPolicy:
    """The owner's settings (config uplink_*)."""

    budget_sat: int  # the most ever signed to upstream routers, all channels together
    deposit_sat: int  # the deposit of each uplink channel (less when the budget left is less)
    margin_percent: int = 20  # resale price = upstream price x (1 + margin)
    unreachable_seconds: int = 30  # an upstream silent this long cannot top up


@dataclass
class UplinkChannel:
    """The uplink channel as the book keeps it (beside PayerSession.record())."""

    number: int  # its client key's index in the wallet (m/1017'/2'/1'/<number>')
    channel_id: str
    deposit: int
    prepay_step: int
    tariff: Tariff
    paid: int = 0  # acknowledged by the upstream router
    signed_max: int = 0  # the most ever signed: what the upstream router can settle


@dataclass
class Book:
    """What the buyer must never forget: what closed channels cost and the open one."""

    spent_closed: int = 0  # sum of the signed_max of uplink channels no longer in use
    next_number: int = 0
    channel: UplinkChannel | None = None
    history: list[dict] = field(default_factory=list)  # closed channels: id, deposit, signed_max

    @property
    def committed(self) -> int:
        return self.spent_closed + (self.channel.signed_max if self.channel else 0)

    def budget_left(self, policy: UplinkPolicy) -> int:
        return max(0, policy.budget_sat - self.committed)

    def retire(self) -> None:
        """The open channel is done with (spent, or closed by either side): its cost is final."""
        if self.channel is not None:
            ch = self.channel
            self.spent_closed += ch.signed_max
            self.history.append({"channel_id": ch.channel_id, "deposit": ch.deposit, "signed_max": ch.signed_max})
            self.channel = None


def next_payment(ch: UplinkChannel, owed: int, budget_left: int) -> int | None:
    """The amount to sign now, or None: credit (paid - owed) below half a step is topped up to
    owed + one step; capped by the deposit and by the budget left (`budget_left` counts
    ch.signed_max as spent already); a change that would be dust is avoided (all of the deposit
    when the budget allows it, else stop that much short)."""
    if ch.paid - owed >= max(1, ch.prepay_step // 2):
        return None
    amount = min(ch.deposit, owed + ch.prepay_step, ch.signed_max + budget_left)
    if 0 < ch.deposit - amount < DUST_LIMIT_SAT:
        amount = ch.deposit if ch.deposit <= ch.signed_max + budget_left else ch.deposit - DUST_LIMIT_SAT
    return amount if amount > max(ch.paid, owed) else None


def channel_spent(ch: UplinkChannel, owed: int) -> bool:
    """No more than half a step of this deposit can still be prepaid: time for the next channel."""
    return ch.deposit - max(ch.paid, owed) < max(1, ch.prepay_step // 2)


def next_deposit(policy: UplinkPolicy, book: Book, wallet_total: int, fee_reserve: int,
                 min_deposit: int, max_deposit: int, prepay_step: int) -> tuple[int, str | None]:
    """The deposit of the next uplink channel and, when none can be opened, why not. No channel
    for less budget than one prepay step (its funding fee would buy next to nothing); the deposit
    is the owner's, cut to the budget left (what could never be spent stays in the wallet) but
    not below the upstream's minimum, nor above its maximum or what the wallet holds beside the
    funding fee. The deposit is not the cost: its unspent part comes back at settlement."""
    left = book.budget_left(policy)
    if left < max(prepay_step, DUST_LIMIT_SAT):
        return 0, BUDGET_SPENT
    deposit = min(max(min(policy.deposit_sat, left), min_deposit), max_deposit)
    if deposit > wallet_total - fee_reserve:
        return 0, WALLET_EMPTY
    return deposit, None


@dataclass(frozen=True)
class Verdict:
    """selling: new client channels may open; cut: paid clients lose access now."""

    selling: bool
    cut: bool
    reason: str | None = None


def verdict(ch: UplinkChannel | None, owed: int, can_top_up: bool, why_not: str | None) -> Verdict:
    """Sell while upstream credit can be kept ahead. Once it cannot (`why_not`: budget spent,
    wallet empty, upstream unreachable), stop selling at once; cut the paid clients when the
    upstream credit left is under a quarter step, so they lose access before the upstream
    router cuts the whole WAN (their channels settle for what they used)."""
    if ch is None:
        return Verdict(False, True, why_not or NO_CHANNEL)
    if can_top_up:
        return Verdict(True, False)
    credit = ch.paid - owed
    return Verdict(False, credit < max(1, ch.prepay_step // 4), why_not)


def resale_tariff(upstream: Tariff, margin_percent: int) -> Tariff:
    """upstream x (1 + margin), each price in whole satoshis, rounded up (never below cost)."""
    def up(price: int) -> int:
        return -(-price * (100 + margin_percent) // 100)

    return Tariff(up(upstream.sat_per_mb), up(upstream.sat_per_minute))


def effective_price(tariff: Tariff, mb_per_minute: int = 1) -> int:
    """Sat per minute of use at `mb_per_minute`: how offers with both prices compare."""
    return tariff.sat_per_mb * mb_per_minute + tariff.sat_per_minute


def cheapest(offers: Iterable[tuple[str, Tariff]], mb_per_minute: int = 1) -> str | None:
    """The portal URL of the cheapest offer (ties: the first given), None when there is none."""
    best: tuple[int, str] | None = None
    for url, tariff in offers:
        price = effective_price(tariff, mb_per_minute)
        if best is None or price < best[0]:
            best = (price, url)
    return best[1] if best else None


def portal_host(url: str) -> str | None:
    """The host of an http(s) portal URL (what the first-hop check compares), else None."""
    try:
        return urlsplit(url).hostname if url.startswith(("http://", "https://")) else None
    except ValueError:
        return None
