"""The owner's price: satoshis per MB and/or per minute, and what a payment buys.

Pure integer arithmetic (no floats near money): what a client owes for what it used, and
what its payments allow, in the units the kernel enforces (total bytes, an expiry time).
"""

from __future__ import annotations

from dataclasses import dataclass

from bitmesh.errors import ConfigError

BYTES_PER_MB = 1_000_000
_DENOM = BYTES_PER_MB * 60  # common denominator of sat/byte and sat/second


@dataclass(frozen=True)
class Allowance:
    """What the kernel enforces: a total byte allowance since access began (upload plus
    download) and a total number of seconds since access began; None = no such limit."""

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
        """What `paid` allows in total. With one price this is exact; with both, each limit
        assumes the remaining credit goes to it alone, and the meter's next pass (which bills
        both) cuts the client when the credit is gone: at most one meter interval late."""
        if self.sat_per_mb and not self.sat_per_minute:
            return Allowance(paid * BYTES_PER_MB // self.sat_per_mb, None)
        if self.sat_per_minute and not self.sat_per_mb:
            return Allowance(None, paid * 60 // self.sat_per_minute)
        credit = max(0, paid - self.owed(bytes_used, seconds_used))
        return Allowance(
            bytes_used + credit * BYTES_PER_MB // self.sat_per_mb,
            seconds_used + credit * 60 // self.sat_per_minute,
        )

    def to_json(self) -> dict:
        return {"sat_per_mb": self.sat_per_mb, "sat_per_minute": self.sat_per_minute}
