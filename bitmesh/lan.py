"""The router's LAN side: which device the `interface` option means and its addresses.

On OpenWrt `interface` is a logical network ("lan"), resolved through ubus to its device
(br-lan); on plain Linux (tests, the demo) it may name the device itself. Addresses come
from the kernel without spawning `ip` (OpenWrt's default ip is the tiny build, without -j).
So does the neighbour table (`neighbours`: one rtnetlink dump), from which a paid device's other
IPv6 addresses are granted with its own (bitmesh.firewall.gate: sync_addresses).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bitmesh.errors import ConfigError

_SIOCGIFADDR = 0x8915

# rtnetlink (linux/rtnetlink.h, linux/neighbour.h)
_RTM_GETNEIGH = 30
_RTM_NEWNEIGH = 28
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NDA_DST, _NDA_LLADDR = 1, 2
# Entry states whose link-layer address the kernel holds as the address's owner (not INCOMPLETE,
# FAILED or NONE): REACHABLE, STALE, DELAY, PROBE, NOARP, PERMANENT.
_NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80


@dataclass(frozen=True)
class Lan:
    device: str
    ipv4: str | None
    ipv6: str | None


def _device_of(interface: str) -> str:
    if Path("/sys/class/net", interface).exists():
        return interface
    try:
        out = subprocess.run(["ubus", "call", f"network.interface.{interface}", "status"],
                             capture_output=True, text=True, timeout=5)
        status = json.loads(out.stdout) if out.returncode == 0 else {}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        status = {}
    device = status.get("l3_device") or status.get("device")
    if not device:
        raise ConfigError(f"interface: {interface!r} is neither a network device nor an OpenWrt network")
    return device


def _ipv4_of(device: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", device.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


def _ipv6_of(device: str, inet6: Path = Path("/proc/net/if_inet6")) -> str | None:
    """The device's first global (scope 00) IPv6 address."""
    try:
        lines = inet6.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hexaddr, _idx, _plen, scope, _flags, name = line.split()
        if name == device and scope == "00":
            return str(ipaddress.IPv6Address(bytes.fromhex(hexaddr)))
    return None


def _ndmsgs(data: bytes):
    """(family, ifindex, state, attributes) of each RTM_NEWNEIGH message in one netlink read; None
    when the dump is done."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            return
        if kind == _NLMSG_DONE:
            yield None
            return
        if kind == _NLMSG_ERROR:
            raise OSError(-struct.unpack_from("=i", data, off + 16)[0], "netlink neighbour dump refused")
        if kind == _RTM_NEWNEIGH:
            family, ifindex, state = struct.unpack_from("=BxxxiH", data, off + 16)
            attrs: dict[int, bytes] = {}
            a = off + 16 + 12
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                attrs[atype & 0x3FFF] = data[a + 4 : a + alen]
                a += (alen + 3) & ~3
            yield family, ifindex, state, attrs
        off += (length + 3) & ~3


def neighbours(device: str) -> list[tuple[str, str]]:
    """(IP address, MAC) of every entry of the kernel's neighbour tables (ARP and NDP) on `device`
    whose link-layer address is known: one rtnetlink dump, no process spawned. [] if the device
    does not exist."""
    try:
        index = socket.if_nametoindex(device)
    except OSError:
        return []
    out: list[tuple[str, str]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(2.0)
        ndmsg = struct.pack("=BxxxiHBB", socket.AF_UNSPEC, 0, 0, 0, 0)
        s.send(struct.pack("=IHHII", 16 + len(ndmsg), _RTM_GETNEIGH, _NLM_F_REQUEST_DUMP, 1, 0) + ndmsg)
        while True:
            for msg in _ndmsgs(s.recv(65536)):
                if msg is None:
                    return out
                family, ifindex, state, attrs = msg
                dst, ll = attrs.get(_NDA_DST), attrs.get(_NDA_LLADDR)
                if ifindex != index or not state & _NUD_VALID or not dst or not ll or len(ll) != 6:
                    continue
                ip = socket.inet_ntop(socket.AF_INET6 if family == socket.AF_INET6 else socket.AF_INET, dst)
                out.append((ip, ":".join(f"{b:02x}" for b in ll)))


def solicit(address: str) -> None:
    """Make the kernel resolve `address` on the LAN (NDP or ARP) by sending it an empty datagram
    (UDP discard port): the device that holds it answers with its MAC, which fills the neighbour
    table. Errors are ignored (an address nobody holds stays unresolved)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(b"", (address, 9))
    except OSError:
        pass


def resolve_lan(interface: str) -> Lan:
    device = _device_of(interface)
    lan = Lan(device, _ipv4_of(device), _ipv6_of(device))
    if lan.ipv4 is None and lan.ipv6 is None:
        raise ConfigError(f"interface: {device} has no IP address yet")
    return lan
