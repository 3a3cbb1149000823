"""Concurrent use: is more than one device answering for a paid client's MAC and IP?

A device that copies both the MAC and the IP of a paying client rides on its grant: the kernel
cannot tell the two apart, and on open Wi-Fi nothing can stop it (docs/security.md: WPA3 OWE is
the fix). What the router can see is that the address now has two owners. It asks the LAN "who
has <ip>?" with an ARP probe (RFC 5227: sender address 0.0.0.0, so no neighbour cache learns
anything from it, broadcast, so it reaches every port of a switch and every station of a Wi-Fi
cell) and counts the answers that come from the client's MAC: a device answers a request for
its own address once, so two such answers to one probe are two devices. A copy made with an
ordinary network stack answers as its original does; one that filters its own ARP answers is
not seen, which is why this is a warning for the victim (the session and the splash page show
it) and never a reason to cut anybody off.

Probes go out from one background thread: every few seconds for a channel whose payer is
looking at its session (the splash page and `bitmesh pay` poll it), every minute for the others.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bitmesh.channel.state import Channel, Phase

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
PROBE_WAIT_S = 0.4  # answers on a LAN come within milliseconds; a sleeping phone's Wi-Fi chip answers too
WATCHED_EVERY_S = 5.0  # a channel whose payer reads its session
IDLE_EVERY_S = 60.0  # every other open, paid channel
WATCHED_FOR_S = 30.0  # a session read keeps its channel "watched" this long


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_probe_frame(own_mac: bytes, ip: str) -> bytes:
    """An RFC 5227 ARP probe for `ip`, broadcast from `own_mac`: "who has ip?" with sender
    address 0.0.0.0, so no host updates its cache from it (padded to Ethernet's 60 bytes)."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, own_mac, b"\0" * 4, b"\0" * 6, socket.inet_aton(ip))
    return (b"\xff" * 6 + own_mac + struct.pack("!H", ETH_P_ARP) + arp).ljust(60, b"\0")


def arp_answer(frame: bytes) -> tuple[str, str] | None:
    """(ip, mac) of an ARP reply frame, or None for anything else."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06" or frame[20:22] != b"\x00\x02":
        return None
    return socket.inet_ntoa(frame[28:32]), frame[22:28].hex(":")


def arp_probe(device: str, targets: Iterable[tuple[str, str]],
              wait: float = PROBE_WAIT_S) -> dict[tuple[str, str], int]:
    """One ARP probe for each (ip, mac) on `device`; how many answers each drew from that MAC
    within `wait` seconds. Needs CAP_NET_RAW (the service runs as root on OpenWrt)."""
    counts = {(ip, mac.lower()): 0 for ip, mac in targets}
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((device, ETH_P_ARP))
        own = s.getsockname()[4]
        for ip, _ in counts:
            s.send(arp_probe_frame(own, ip))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                frame, addr = s.recvfrom(128)
            except TimeoutError:
                break
            answer = arp_answer(frame)
            if addr[2] != socket.PACKET_OUTGOING and answer in counts:
                counts[answer] += 1
    return counts


@dataclass
class Verdict:
    """What the probes of one channel's (MAC, IP) found so far."""

    checked_at: int | None = None  # unix time of the last probe that got an answer
    first_seen: int | None = None  # when a probe first drew answers from two devices
    last_seen: int | None = None
    times: int = 0  # probes that drew answers from more than one device
    most_answers: int = 0

    def to_json(self) -> dict:
        return {"detected": self.times > 0, "checked_at": self.checked_at, "first_seen": self.first_seen,
                "last_seen": self.last_seen, "times": self.times, "most_answers": self.most_answers}


@dataclass
class _Target:
    ip: str
    mac: str
    verdict: Verdict = field(default_factory=Verdict)
    probed_at: float = float("-inf")  # monotonic
    asked_at: float = float("-inf")  # monotonic: the payer last read its session


def watched(channel: Channel) -> bool:
    """Channels whose grant can be copied: open, paid, bound to an IPv4 address and a MAC."""
    if not (channel.phase is Phase.OPEN and channel.paid and channel.client_mac and channel.client_ip):
        return False
    try:
        return ipaddress.ip_address(channel.client_ip).version == 4
    except ValueError:
        return False


class CloneWatch:
    """Probes the open, paid channels' addresses in the background; `verdict(channel)` is what
    the session answer shows."""

    def __init__(self, channels: Callable[[], list[Channel]], device_of: Callable[[str], str],
                 probe: Callable[..., dict[tuple[str, str], int]] = arp_probe,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self._channels = channels
        self._device_of = device_of
        self._probe = probe
        self._clock = clock
        self._monotonic = monotonic
        self._targets: dict[str, _Target] = {}  # by channel id
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False  # logged once

    def start(self) -> CloneWatch:
        self._thread = threading.Thread(target=self._run, name="clone-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    def verdict(self, channel: Channel) -> dict | None:
        """The channel's verdict (None: its grant is not watched); marks it as looked at, so that
        it is probed every few seconds while its payer keeps asking."""
        if not watched(channel):
            return None
        with self._lock:
            target = self._target(channel)
            first_look = target.asked_at == float("-inf")
            target.asked_at = self._monotonic()
            answer = target.verdict.to_json()
        if first_look:
            self._wake.set()  # probe it now rather than at the next minute
        return answer

    def _target(self, channel: Channel) -> _Target:
        target = self._targets.get(channel.id)
        if target is None or (target.ip, target.mac) != (channel.client_ip, channel.client_mac):
            target = self._targets[channel.id] = _Target(channel.client_ip, channel.client_mac)
        return target

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.sweep()
            except Exception:  # a bug here must never take the portal down; said once
                if not self._failed:
                    log.exception("concurrent-use probe failed")
                    self._failed = True
            self._wake.wait(1.0)
            self._wake.clear()

    def sweep(self) -> None:
        """Probe every channel that is due (one batch per interface)."""
        now = self._monotonic()
        live = [ch for ch in self._channels() if watched(ch)]
        due: dict[str, list[_Target]] = {}
        with self._lock:
            self._targets = {ch.id: self._target(ch) for ch in live}  # forget closed channels
            for target in self._targets.values():
                every = WATCHED_EVERY_S if now - target.asked_at < WATCHED_FOR_S else IDLE_EVERY_S
                if now - target.probed_at >= every:
                    target.probed_at = now
                    due.setdefault(self._device_of(target.ip), []).append(target)
        for device, targets in due.items():
            if not device:
                continue  # not in the neighbour table now: nobody answers for it
            counts = self._probe(device, [(t.ip, t.mac) for t in targets])
            stamp = int(self._clock())
            with self._lock:
                for t in targets:
                    answers = counts.get((t.ip, t.mac.lower()), 0)
                    v = t.verdict
                    if answers:
                        v.checked_at = stamp
                    if answers > 1:
                        v.first_seen = v.first_seen or stamp
                        v.last_seen = stamp
                        v.times += 1
                        v.most_answers = max(v.most_answers, answers)
                        log.warning("concurrent use: %d devices answered for %s %s", answers, t.mac, t.ip)


def start_clone_watch(channels: Callable[[], list[Channel]], device_of: Callable[[str], str]) -> CloneWatch | None:
    """A running CloneWatch, or None (said once) where raw sockets are not allowed."""
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)):
            pass
    except (OSError, AttributeError) as e:
        log.warning("no concurrent-use checks: cannot open a raw ARP socket (%s)", e)
        return None
    return CloneWatch(channels, device_of).start()


__all__ = ["CloneWatch", "Verdict", "arp_answer", "arp_probe", "arp_probe_frame", "start_clone_watch", "watched"]
