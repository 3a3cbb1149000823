"""The meter: turns channel payments into kernel access and kernel counters into bills.

It listens to the channel manager: a payment raises the client's allowance in the gate
(bitmesh.firewall), a closed channel revokes it. `tick()` (the service calls it every few
seconds, never in a busy loop) reads every counter with one `nft -j` call, records usage
and cuts a client whose credit is gone under a combined tariff (with one price the kernel
already cut it at the exact byte or second).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.state import Channel, Phase
from bitmesh.firewall.gate import ClientUsage, Gate
from bitmesh.firewall.ruleset import PaidClient
from bitmesh.tariff import Tariff

log = logging.getLogger(__name__)


def tariff_of(channel: Channel) -> Tariff:
    return Tariff(channel.sat_per_mb, channel.sat_per_minute)


@dataclass(frozen=True)
class Session:
    """A client's session as the portal shows it (GET /api/session)."""

    state: str  # unpaid | open | exhausted | closed
    channel: Channel | None
    owed: int = 0
    bytes_remaining: int | None = None
    seconds_remaining: int | None = None

    def to_json(self, prepay_step: int) -> dict:
        ch = self.channel
        paid = ch.paid if ch else 0
        return {
            "state": self.state,
            "channel_id": ch.id if ch else None,
            "channel_state": ch.phase.value if ch else None,
            "deposit": ch.deposit if ch else 0,
            "paid": paid,
            "owed": self.owed,
            "credit": paid - self.owed,
            "bytes_used": ch.bytes_used if ch else 0,
            "seconds_used": ch.seconds_used if ch else 0,
            "bytes_remaining": self.bytes_remaining,
            "seconds_remaining": self.seconds_remaining,
            "prepay_step_sat": prepay_step,
            "tariff": tariff_of(ch).to_json() if ch and (ch.sat_per_mb or ch.sat_per_minute) else None,
        }


class Meter:
    def __init__(self, manager: ChannelManager, gate: Gate | None, clock: Callable[[], float] = time.time):
        self.manager = manager
        self.gate = gate
        self.clock = clock
        manager.listeners.append(self.on_channel)
        manager.owed = self.owed

    # --- money -------------------------------------------------------------------------------

    def owed(self, channel: Channel) -> int:
        """What the client owes at settlement. Without a gate nothing was metered, and what
        was paid is the price."""
        if not self._gated(channel):
            return channel.paid
        return self.metered_owed(self._measure(channel))

    @staticmethod
    def metered_owed(channel: Channel) -> int:
        """The bill for the usage recorded on `channel`; never more than it paid (the kernel
        stopped it there)."""
        if not channel.access_started_at:
            return 0
        return min(channel.paid, tariff_of(channel).owed(channel.bytes_used, channel.seconds_used))

    def _measure(self, channel: Channel, usage: dict[str, ClientUsage] | None = None) -> Channel:
        """Fresh usage from the kernel (and the clock) for one live channel."""
        if channel.phase is not Phase.OPEN or not channel.access_started_at:
            return channel
        if usage is None:
            usage = self.gate.usage() if self.gate else {}
        live = usage.get(channel.client_mac)
        bytes_used = max(channel.bytes_used, live.total) if live else channel.bytes_used
        seconds_used = max(0, int(self.clock()) - channel.access_started_at)
        allowed = tariff_of(channel).allowance(channel.paid, 0, 0).total_seconds
        if allowed is not None and not channel.sat_per_mb:
            seconds_used = min(seconds_used, allowed)  # time-only: nothing is used after expiry
        return self.manager.note_usage(channel.id, bytes_used, seconds_used)

    def session(self, channel: Channel | None) -> Session:
        if channel is None or channel.phase is Phase.AWAITING_FUNDING or not channel.paid:
            return Session("unpaid", channel)
        if channel.phase is not Phase.OPEN:
            return Session("closed", channel, owed=channel.owed if channel.owed is not None else channel.paid)
        channel = self._measure(channel)
        owed = self.metered_owed(channel)
        allowance = tariff_of(channel).allowance(channel.paid, channel.bytes_used, channel.seconds_used)
        bytes_left = None if allowance.total_bytes is None else max(0, allowance.total_bytes - channel.bytes_used)
        secs_left = None if allowance.total_seconds is None else max(0, allowance.total_seconds - channel.seconds_used)
        exhausted = owed >= channel.paid or bytes_left == 0 or secs_left == 0
        return Session("exhausted" if exhausted else "open", channel, owed, bytes_left, secs_left)

    # --- the kernel side ---------------------------------------------------------------------

    def paid_client(self, channel: Channel) -> PaidClient:
        allowance = tariff_of(channel).allowance(channel.paid, channel.bytes_used, channel.seconds_used)
        expires_at = None
        if allowance.total_seconds is not None:
            expires_at = float(channel.access_started_at + allowance.total_seconds)
        ip = ipaddress.ip_address(channel.client_ip)
        return PaidClient(
            mac=channel.client_mac,
            ipv4=str(ip) if ip.version == 4 else None,
            ipv6=(str(ip),) if ip.version == 6 else (),
            quota_bytes=allowance.total_bytes,
            expires_at=expires_at,
            used_up=channel.bytes_used,
        )

    def _gated(self, channel: Channel) -> bool:
        return self.gate is not None and bool(channel.client_mac and channel.client_ip)

    def on_channel(self, new: Channel, old: Channel | None) -> None:
        if not self._gated(new):
            return
        assert self.gate is not None
        if new.phase is Phase.OPEN and new.paid:
            client = self.paid_client(new)
            if new.client_mac in self.gate.clients():
                self.gate.update_quota(new.client_mac, quota_bytes=client.quota_bytes, expires_at=client.expires_at)
            else:
                self.gate.allow(client)
            log.info("channel %s: %s paid %d sat, allowance %s bytes / until %s", new.id, new.client_mac,
                     new.paid, client.quota_bytes, client.expires_at)
        elif old is not None and old.phase is Phase.OPEN and new.phase is not Phase.OPEN:
            self.gate.revoke(new.client_mac)
            log.info("channel %s: %s access revoked (%s)", new.id, new.client_mac, new.phase.value)

    def restore(self) -> None:
        """After a restart: every open, paid channel's client back in the kernel, with what
        the journal says it used (the kernel's own counters win if the table survived)."""
        if self.gate is None:
            return
        clients = [self.paid_client(ch) for ch in self.manager.channels()
                   if ch.phase is Phase.OPEN and ch.paid and self._gated(ch)]
        self.gate.start(clients)
        log.info("firewall loaded with %d paid clients", len(clients))

    def tick(self) -> None:
        """One metering pass: one kernel read for all clients."""
        if self.gate is None:
            return
        usage = self.gate.usage()
        for channel in self.manager.channels():
            if channel.phase is not Phase.OPEN or not channel.access_started_at or not self._gated(channel):
                continue
            channel = self._measure(channel, usage)
            tariff = tariff_of(channel)
            both = tariff.sat_per_mb and tariff.sat_per_minute
            in_gate = channel.client_mac in self.gate.clients()
            if both and in_gate and tariff.owed(channel.bytes_used, channel.seconds_used) >= channel.paid:
                self.gate.revoke(channel.client_mac)  # the next payment lets it back in
                log.info("channel %s: credit used up, %s cut off", channel.id, channel.client_mac)
