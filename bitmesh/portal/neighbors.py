"""Who is asking: the MAC address behind a LAN IP, from the kernel's neighbour tables.

The portal binds a session to the caller's MAC and IP; the firewall then grants access to
exactly that pair. IPv4 comes from /proc/net/arp (no process spawned); IPv6 from
`ip -6 neigh`. Answers are cached briefly: a wallet polls its session every few seconds.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time
from pathlib import Path

_CACHE_SECONDS = 30.0


class NeighborTable:
    def __init__(self, arp_path: Path = Path("/proc/net/arp")):
        self.arp_path = arp_path
        self._cache: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def mac_of(self, ip: str) -> str:
        """The MAC of a directly connected neighbour, or "" (not on the LAN, or not yet seen)."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(ip)
            if hit and now - hit[0] < _CACHE_SECONDS:
                return hit[1]
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ""
        mac = self._arp(str(addr)) if addr.version == 4 else self._ndp(str(addr))
        if mac:
            with self._lock:
                self._cache[ip] = (now, mac)
        return mac

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
