"""The owner's price: satoshis per MB and/or per minute, and what a payment buys.

Pure integer arithmetic (no floats near money): what a client owes for what it used, what its
payments allow in the units the kernel enforces (total bytes, total seconds), and the billing
clock, which runs only while the client has credit: time without credit (cut off, waiting to
pay again) is never billed, and a payment after such a gap buys its full worth.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitmesh.channel.state import Channel
from bitmesh.errors import ConfigError

BYTES_PER_MB = 1_000_000
_DENOM = BYTES_PER_MB * 60  # common denominator of sat/byte and sat/second


@dataclass(frozen=True)
class Allowance:
    """What the kernel enforces: a total byte allowance since access began (upload plus
    download) and a total number of billed seconds; None = no such limit."""

    total_bytes: int | None
    total_seconds: int | None


@dataclass(frozen=True)
class Tariff:
    sat_per_mb: int = 0
    sat_per_minute: int = 0

    def __post_init__(self) -> None:
        if self.sat_per_mb < 0 or self.sat_per_minute < 0 or not (self.sat_per_mb or self.sat_per_minute):
            raise ConfigError("at least one price must be > 0 and none negative")

    def owed(self, bytes_used: int, seconds_used: int) -> int:
        """Satoshis for this usage, rounded up (a started satoshi is owed)."""
        numerator = bytes_used * self.sat_per_mb * 60 + seconds_used * self.sat_per_minute * BYTES_PER_MB
        return -(-numerator // _DENOM)

    def allowance(self, paid: int, bytes_used: int, seconds_used: int) -> Allowance:
        """What `paid` allows in total: the most bytes it pays for beside `seconds_used`, and the
        most seconds beside `bytes_used` (each limit assumes the rest of the credit goes to it
        alone). Exact: `owed(total_bytes, seconds_used)` and `owed(bytes_used, total_seconds)`
        never exceed `paid`, and one more byte or second would. With both prices the meter cuts
        the client when either limit is reached given the other's usage."""
        budget = paid * _DENOM
        total_bytes = total_seconds = None
        if self.sat_per_mb:
            room = budget - seconds_used * self.sat_per_minute * BYTES_PER_MB
            total_bytes = max(0, room // (self.sat_per_mb * 60))
        if self.sat_per_minute:
            room = budget - bytes_used * self.sat_per_mb * 60
            total_seconds = max(0, room // (self.sat_per_minute * BYTES_PER_MB))
        return Allowance(total_bytes, total_seconds)

    def billed_seconds(self, paid: int, bytes_used: int, running: int) -> int:
        """Seconds billed after `running` seconds on the clock: the clock stops where `paid` runs
        out beside `bytes_used` (with a byte price only, time is free and just counted)."""
        covered = self.allowance(paid, bytes_used, 0).total_seconds
        return running if covered is None else min(running, covered)

    def to_json(self) -> dict:
        return {"sat_per_mb": self.sat_per_mb, "sat_per_minute": self.sat_per_minute}


def tariff_of(channel: Channel) -> Tariff:
    """The tariff a channel opened with (later price changes apply to new channels only)."""
    return Tariff(channel.sat_per_mb, channel.sat_per_minute)


def _priced(channel: Channel) -> bool:
    return bool(channel.sat_per_mb or channel.sat_per_minute)


# --- the billing clock -----------------------------------------------------------------------
# `Channel.access_started_at` is the clock's origin: while the client has credit, it has been
# billed `now - origin` seconds. The clock stops by itself where the credit runs out (no state
# to keep while a client is cut off); a payment moves the origin forward by the time it stood
# still, so the gap is never billed. The origin travels in every payment's journal record.


def seconds_billed(channel: Channel, now: int | None) -> int:
    """Seconds `channel` is billed for at unix time `now` (None: its clock is not running, e.g.
    the channel is no longer open): never below its last reading, never past its credit."""
    if not channel.access_started_at or now is None or not _priced(channel):
        return channel.seconds_used
    running = max(0, now - channel.access_started_at)
    return max(channel.seconds_used, tariff_of(channel).billed_seconds(channel.paid, channel.bytes_used, running))


def clock_origin(channel: Channel, now: int) -> int:
    """The clock's origin once a payment to `channel` (as it was before that payment) arrives at
    unix time `now`: the first payment starts the clock; a later one restarts it where it stopped
    if the credit had run out (a client still within its credit keeps its origin)."""
    if not channel.access_started_at:
        return now
    return now - seconds_billed(channel, now)
