"""Who is asking: the MAC address behind a LAN IP, from the kernel's neighbour tables.

The portal binds a session to the caller's MAC and IP; the firewall then grants access to
exactly that pair. IPv4 comes from /proc/net/arp (no process spawned); IPv6 from
`ip -6 neigh`. Every answer is the kernel's at the moment of the request, never a cached one: a
device that takes a client's IP with its own MAC is that other MAC as soon as the kernel learns
it (a cache here once kept it the client for 30 s, and with it the client's session).
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path


class NeighborTable:
    def __init__(self, arp_path: Path = Path("/proc/net/arp")):
        self.arp_path = arp_path

    def mac_of(self, ip: str) -> str:
        """The MAC of a directly connected neighbour, or "" (not on the LAN, or not yet seen)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ""
        return self._arp(str(addr)) if addr.version == 4 else self._ndp(str(addr))

    def device_of(self, ip: str) -> str:
        """The interface an IPv4 neighbour is on (its /proc/net/arp row), or ""."""
        try:
            lines = self.arp_path.read_text().splitlines()[1:]
        except OSError:
            return ""
        return next((f[5] for f in map(str.split, lines) if len(f) >= 6 and f[0] == ip), "")

    def _arp(self, ip: str) -> str:
        try:
            lines = self.arp_path.read_text().splitlines()[1:]
        except OSError:
            return ""
        for line in lines:
            fields = line.split()
            # IP address, HW type, Flags (0x2 = complete), HW address, Mask, Device
            if len(fields) >= 4 and fields[0] == ip and int(fields[2], 16) & 0x2:
                return fields[3].lower()
        return ""

    def _ndp(self, ip: str) -> str:
        try:
            out = subprocess.run(["ip", "-6", "neigh", "show", ip], capture_output=True, text=True, timeout=2).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
        fields = out.split()
        if "lladdr" in fields and fields.index("lladdr") + 1 < len(fields):
            return fields[fields.index("lladdr") + 1].lower()
        return ""
