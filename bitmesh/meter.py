"""The meter: turns channel payments into kernel access and kernel counters into bills.

It listens to the channel manager: a payment raises the client's allowance in the gate
(bitmesh.firewall), a closed channel revokes it. `tick()` (the service calls it every few
seconds, never in a busy loop) reads every counter with one `nft -j` call, records usage
and cuts a client whose credit is gone under a combined tariff (with one price the kernel
already cut it at the exact byte or second).

What a client owes is one figure everywhere (session, channel object, payment answers,
settlement): the tariff applied to the bytes the kernel counted and the seconds its billing
clock ran (bitmesh.tariff: the clock stops while the client has no credit), never more than it
paid. Without a gate (`bitmesh serve --no-firewall`) nothing is measured: every satoshi paid is
owed, and the offer says so (`"metered": false`).

One device, one billed channel: the grant in the kernel is keyed by MAC, so the portal refuses
a second live channel per device; a journal written before that rule may still hold two, and
then only the older one is granted and billed (`device_holders`).

A device's grant is its channel's address plus the device's other IPv6 addresses (SLAAC, privacy
addresses) that the kernel's neighbour table binds to its MAC: taken at the grant, and at every
pass, where an address the device used without a grant yet (the gate notes it) is solicited so
the table learns whether it really is that device's (bitmesh.lan: neighbours, solicit).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bitmesh import lan
from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.state import Channel, Phase
from bitmesh.firewall.gate import ClientUsage, Gate
from bitmesh.firewall.ruleset import PaidClient
from bitmesh.tariff import seconds_billed, tariff_of

log = logging.getLogger(__name__)

# A session answer (GET /api/session, the captive probes, a payment's answer) may state usage read
# this long ago; a settlement always reads anew. The kernel enforces the quota meanwhile.
SESSION_READ_AGE = 1.0
# While a kernel read is under way, a session answer takes the previous one if it is this recent,
# instead of queueing behind the read (and the grant or quota update that may hold the gate).
SESSION_READ_BUSY_AGE = 5.0
SOLICIT_WAIT = 0.2  # seconds the answers to a pass's neighbour solicitations may take
SOLICIT_AGAIN = 10.0  # an address that did not answer is solicited again after this long
SOLICIT_MAX = 32  # addresses solicited per pass at most

__all__ = ["Meter", "Reading", "Session", "device_holders", "read_usage", "tariff_of"]


# --- pure decisions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """A channel's usage at one moment, and what it means in money and in what is left."""

    bytes_used: int
    seconds_used: int
    owed: int  # never more than paid
    bytes_left: int | None  # None: no byte price
    seconds_left: int | None  # None: no time price

    @property
    def exhausted(self) -> bool:
        """The credit is used up: the client must pay more to go on (its clock has stopped)."""
        return self.bytes_left == 0 or self.seconds_left == 0


def read_usage(channel: Channel, now: int | None, kernel_bytes: int | None = None) -> Reading:
    """`channel`'s usage at unix time `now` (None: its clock is not running) given the bytes the
    kernel counted for it (None: not in the kernel); counts never go down."""
    bytes_used = max(channel.bytes_used, kernel_bytes or 0)
    if not (channel.sat_per_mb or channel.sat_per_minute):  # a record without a tariff: nothing billable
        return Reading(bytes_used, channel.seconds_used, 0, None, None)
    seconds = seconds_billed(channel.evolve(bytes_used=bytes_used), now)
    tariff = tariff_of(channel)
    owed = min(channel.paid, tariff.owed(bytes_used, seconds)) if channel.access_started_at else 0
    allowance = tariff.allowance(channel.paid, bytes_used, seconds)
    bytes_left = None if allowance.total_bytes is None else max(0, allowance.total_bytes - bytes_used)
    seconds_left = None if allowance.total_seconds is None else max(0, allowance.total_seconds - seconds)
    return Reading(bytes_used, seconds, owed, bytes_left, seconds_left)


def device_holders(channels: Iterable[Channel]) -> dict[str, Channel]:
    """Each device's (MAC's) one granted and billed channel: its oldest open, paid channel."""
    live = [ch for ch in channels if ch.phase is Phase.OPEN and ch.paid and ch.client_mac and ch.client_ip]
    holders: dict[str, Channel] = {}
    for ch in sorted(live, key=lambda ch: (ch.created_at, ch.id)):
        holders.setdefault(ch.client_mac, ch)
    return holders


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


# --- the meter -----------------------------------------------------------------------------------


class Meter:
    def __init__(self, manager: ChannelManager, gate: Gate | None, clock: Callable[[], float] = time.time,
                 neighbours: Callable[[], list[tuple[str, str]]] | None = None,
                 solicit: Callable[[str], None] = lan.solicit):
        self.manager = manager
        self.gate = gate
        self.clock = clock
        # The kernel's neighbour table of the gated LAN: (address, MAC) pairs.
        self.neighbours = neighbours or (lambda: lan.neighbours(gate.config.lan_interface) if gate else [])
        self.solicit = solicit
        self._solicited: dict[str, float] = {}  # address -> monotonic time of its last solicitation
        # A grant (a payment, under the manager's lock) and a cut for credit (the timer thread)
        # are decided one at a time, on the channel as it is then: a payment arriving while a
        # meter pass finds the credit gone is never cut off after it.
        self._lock = threading.Lock()
        # One kernel read (an `nft -j list table`, ~40 ms with 200 devices) is shared by the session
        # answers within SESSION_READ_AGE: hundreds of wallets polling cost one read, not one each.
        self._read_lock = threading.Lock()
        self._reading: tuple[float, dict[str, ClientUsage]] | None = None  # (monotonic start, usage)
        manager.listeners.append(self.on_channel)
        manager.owed = self.owed
        manager.freeze = self.freeze
        manager.thaw = self.thaw

    @property
    def metered(self) -> bool:
        """False without a gate (`bitmesh serve --no-firewall`): nothing is measured."""
        return self.gate is not None

    # --- money -------------------------------------------------------------------------------

    def owed(self, channel: Channel) -> int:
        """What `channel` settles for, now: the figure every answer states as `owed` and the
        settlement charges. Fixed once a settlement is signed."""
        if channel.owed is not None:
            return channel.owed
        if not channel.paid:
            return 0
        if not self.metered:
            return channel.paid  # no meter: what was paid is the price
        if not self._gated(channel):
            return 0  # never had access (no MAC to grant): nothing was used
        return self._measure(channel)[1].owed

    def usage(self, max_age: float = 0.0) -> dict[str, ClientUsage]:
        """Every device's kernel counts: from a read started at most `max_age` seconds ago, or a new
        one (0: started after this call, as a settlement needs). Callers that come during a read
        wait for it and share it."""
        assert self.gate is not None
        asked = time.monotonic()
        last = self._reading
        if max_age and last is not None:
            if last[0] >= asked - max_age:
                return last[1]
            if self._read_lock.locked() and last[0] >= asked - SESSION_READ_BUSY_AGE:
                return last[1]  # a session answer never waits behind a read or a grant in progress
        with self._read_lock:
            if self._reading is not None and self._reading[0] >= asked - max_age:
                return self._reading[1]
            started = time.monotonic()
            usage = self.gate.usage()
            self._reading = (started, usage)
            return usage

    def _measure(self, channel: Channel, usage: dict[str, ClientUsage] | None = None,
                 holds_grant: bool | None = None, max_age: float = 0.0, keep: bool = True
                 ) -> tuple[Channel, Reading]:
        """Usage from the kernel (a read at most `max_age` s old) and the clock for one channel; a
        live one keeps it (`keep`: the manager records it, under its lock), else the channel comes
        back with the reading as a snapshot only. The kernel's count for a device is its grant
        holder's alone (never billed twice)."""
        if channel.phase is not Phase.OPEN or not channel.access_started_at:
            return channel, read_usage(channel, None)
        if holds_grant is None:
            holder = device_holders(self.manager.channels()).get(channel.client_mac)
            holds_grant = self._gated(channel) and holder is not None and holder.id == channel.id
        kernel = None
        if holds_grant:
            if usage is None:
                usage = self.usage(max_age) if self.gate else {}
            live = usage.get(channel.client_mac)
            kernel = live.total if live else None
        reading = read_usage(channel, int(self.clock()), kernel)
        if keep:
            channel = self.manager.note_usage(channel.id, reading.bytes_used, reading.seconds_used)
        elif (reading.bytes_used, reading.seconds_used) != (channel.bytes_used, channel.seconds_used):
            channel = channel.evolve(bytes_used=reading.bytes_used, seconds_used=reading.seconds_used)
        return channel, reading

    def session(self, channel: Channel | None) -> Session:
        if channel is None or channel.phase is Phase.AWAITING_FUNDING or not channel.paid:
            return Session("unpaid", channel)
        if channel.phase is not Phase.OPEN:
            return Session("closed", channel, owed=self.owed(channel))
        if not self.metered:
            return Session("open", channel, owed=channel.paid)  # nothing measured, nothing left to show
        if not self._gated(channel):
            return Session("exhausted", channel, owed=0)  # the kernel can never let it in
        # A snapshot: a session answer (hundreds of wallets polling) never waits for the manager's
        # lock, which a payment holds through its fsync and its kernel grant; the meter's pass
        # and a settlement record usage.
        channel, r = self._measure(channel, max_age=SESSION_READ_AGE, keep=False)
        return Session("exhausted" if r.exhausted else "open", channel, r.owed, r.bytes_left, r.seconds_left)

    # --- the kernel side ---------------------------------------------------------------------

    def paid_client(self, channel: Channel) -> PaidClient:
        """The kernel's grant for `channel`: its byte allowance, and the moment its billing clock
        reaches the seconds paid for (the clock's origin plus the seconds allowed)."""
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

    def _grant(self, channel: Channel) -> None:
        assert self.gate is not None
        client = self.paid_client(channel)
        if channel.client_mac in self.gate.clients():
            self.gate.update_quota(channel.client_mac, quota_bytes=client.quota_bytes, expires_at=client.expires_at)
        else:
            self.gate.allow(client)
            self.learn(solicit=False)  # its other IPv6 addresses the kernel knows already
        log.info("channel %s: %s paid %d sat, allowance %s bytes / until %s", channel.id, channel.client_mac,
                 channel.paid, client.quota_bytes, client.expires_at)

    def on_channel(self, new: Channel, old: Channel | None) -> None:
        if not self._gated(new):
            return
        assert self.gate is not None
        with self._lock:
            if new.phase is Phase.OPEN and new.paid:
                # A payment is published after the manager's lock (ChannelManager.pay): grant the
                # channel as it is when this turn comes, never an older figure, and nothing to a
                # channel closed meanwhile (its close revoked, or will).
                latest = next((ch for ch in self.manager.channels() if ch.id == new.id), None)
                if latest is None or latest.phase is not Phase.OPEN:
                    return
                new = latest if latest.paid >= new.paid else new
            holder = device_holders(self.manager.channels()).get(new.client_mac)
            if new.phase is Phase.OPEN and new.paid:
                if holder is not None and holder.id != new.id:
                    log.error("channel %s: device %s already holds channel %s; not granted", new.id,
                              new.client_mac, holder.id)
                    return
                self._grant(new)
            elif old is not None and old.phase is Phase.OPEN and new.phase is not Phase.OPEN:
                if holder is not None and (holder.created_at, holder.id) < (new.created_at, new.id):
                    return  # the device's grant is its older channel's, untouched
                self.gate.revoke(new.client_mac)
                log.info("channel %s: %s access revoked (%s)", new.id, new.client_mac, new.phase.value)
                if holder is not None:
                    self._grant(holder)

    def freeze(self, channel: Channel) -> None:
        """A close is about to read `channel`'s final usage: its device's traffic stops first (the
        gate lowers its quota in place to nothing), so nothing passes unbilled between that read
        and the revoke. Only the device's grant holder's (another channel's grant is not this
        close's to stop). A failed freeze leaves the close as it was: billed to the read."""
        if not self._gated(channel) or channel.phase is not Phase.OPEN:
            return
        assert self.gate is not None
        holder = device_holders(self.manager.channels()).get(channel.client_mac)
        if holder is None or holder.id != channel.id:
            return
        try:
            self.gate.freeze(channel.client_mac)
        except Exception:
            log.exception("channel %s: freezing %s before the final read failed", channel.id, channel.client_mac)

    def thaw(self, channel: Channel) -> None:
        """The close failed: the channel is still open, its device gets its access back."""
        if not self._gated(channel):
            return
        assert self.gate is not None
        try:
            self.gate.thaw(channel.client_mac)
        except Exception:
            log.exception("channel %s: giving %s its access back failed; its next payment (or a restart) "
                          "does", channel.id, channel.client_mac)

    def restore(self) -> None:
        """After a restart: every device's open, paid channel back in the kernel, with what the
        journal says it used (the kernel's own counters win if the table survived: a client that
        used up its credit meanwhile is carried with its count, and stays cut off)."""
        if self.gate is None:
            return
        clients = [self.paid_client(ch) for ch in device_holders(self.manager.channels()).values()]
        self.gate.start(clients)
        log.info("firewall loaded with %d paid clients", len(clients))

    def tick(self) -> None:
        """One metering pass: one kernel read for all clients."""
        if self.gate is None:
            return
        usage = self.usage()
        for channel in device_holders(self.manager.channels()).values():
            channel, reading = self._measure(channel, usage, holds_grant=True)
            if channel.sat_per_mb and channel.sat_per_minute and reading.exhausted:
                self._cut_if_exhausted(channel.id)
        self.learn()

    def learn(self, solicit: bool = True) -> None:
        """Paid devices' IPv6 addresses in line with the kernel's neighbour table: the addresses
        the last read saw them use without a grant are solicited first (a few at a time, each at
        most every SOLICIT_AGAIN s), so the table says within SOLICIT_WAIT whose they are."""
        if self.gate is None:
            return
        try:
            table = self.neighbours()
            if solicit:
                now = time.monotonic()
                todo = [a for a in self.gate.unresolved(table)
                        if now - self._solicited.get(a, -SOLICIT_AGAIN) >= SOLICIT_AGAIN][:SOLICIT_MAX]
                self._solicited = {a: t for a, t in self._solicited.items() if now - t < SOLICIT_AGAIN}
                for address in todo:
                    self._solicited[address] = now
                    self.solicit(address)
                if todo:
                    time.sleep(SOLICIT_WAIT)
                    table = self.neighbours()
            self.gate.sync_addresses(table)
        except Exception:
            log.exception("granting paid devices' IPv6 addresses failed; the next pass tries again")

    def _cut_if_exhausted(self, channel_id: str) -> None:
        """Cut a combined-tariff client off once its credit is gone (the next payment lets it back
        in); decided again under the lock, on the channel as it is now."""
        assert self.gate is not None
        with self._lock:
            channel = self.manager.get(channel_id)
            if channel.phase is not Phase.OPEN or channel.client_mac not in self.gate.clients():
                return
            if read_usage(channel, int(self.clock())).exhausted:
                self.gate.revoke(channel.client_mac)
                log.info("channel %s: credit used up, %s cut off", channel.id, channel.client_mac)
