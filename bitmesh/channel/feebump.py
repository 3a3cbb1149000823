"""When and how far to raise a settlement's fee: pure decisions, no I/O.

A settlement must confirm in a block before the client's refund becomes valid (a height
expiry: in block `expiry` at the latest; the refund can be in block `expiry + 1`). While it is
unconfirmed the router watches the fee the backend says that takes and, when the settlement
(with its children so far) pays less, adds a CPFP child from the owner's share (contract.py,
"hold output"). The target shrinks with the blocks left, so the last blocks are bid for hardest.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitmesh.channel import contract as c

# Aim to confirm within a third of the blocks left (so a late spike still leaves blocks to
# bump again), never slower than 6 blocks, never faster than the next one.
MAX_TARGET_BLOCKS = 6
# With this few blocks left, a package that sat through a block at its rate is doubled: the
# backend's estimate may lag the miners' real floor during a spike.
LAST_RESORT_BLOCKS = 3
SECONDS_PER_BLOCK = 600


def blocks_left(expiry: int, tip_height: int, mtp: int) -> int:
    """Blocks the settlement can still confirm in before the refund is valid (0: too late)."""
    if expiry >= c.LOCKTIME_THRESHOLD:  # unix time, checked against median-time-past
        return max(0, (expiry - mtp) // SECONDS_PER_BLOCK)
    return max(0, expiry - tip_height)


def target_blocks(left: int) -> int:
    return max(1, min(MAX_TARGET_BLOCKS, left // 3))


@dataclass(frozen=True)
class Package:
    """The settlement and its CPFP children so far, as a miner weighs them."""

    fee: int
    vsize: int

    @property
    def feerate(self) -> float:
        return self.fee / self.vsize


def needed_feerate(estimate: float, package: Package, left: int, sat_through_a_block: bool) -> float:
    """The feerate the package must reach now: the backend's estimate for the target, and at
    the last blocks twice what did not get mined."""
    if left <= LAST_RESORT_BLOCKS and sat_through_a_block:
        return max(estimate, package.feerate * 2)
    return estimate


def child_fee(package: Package, child_vsize: int, feerate: float, budget: int) -> int | None:
    """The fee a new child must pay so that package + child reach `feerate`; at least the
    minimum relay fee of the child itself; at most `budget` (what the hold output can give and
    keep dust). None when no child is needed."""
    if package.feerate >= feerate:
        return None
    fee = c.fee_for(feerate, package.vsize + child_vsize) - package.fee
    fee = max(fee, c.fee_for(1.0, child_vsize))
    return min(fee, budget) if budget > 0 else None
