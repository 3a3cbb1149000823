"""The router's LAN side: which device the `interface` option means and its addresses.

On OpenWrt `interface` is a logical network ("lan"), resolved through ubus to its device
(br-lan); on plain Linux (tests, the demo) it may name the device itself. Addresses come
from the kernel without spawning `ip` (OpenWrt's default ip is the tiny build, without -j).
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


def resolve_lan(interface: str) -> Lan:
    device = _device_of(interface)
    lan = Lan(device, _ipv4_of(device), _ipv6_of(device))
    if lan.ipv4 is None and lan.ipv6 is None:
        raise ConfigError(f"interface: {device} has no IP address yet")
    return lan
