"""Attacks on the walled garden and on billing, from inside the namespaces of a `Topology`
(tests/test_firewall_netns.py, bench/garden.py): one device that downloads through many source
addresses at once, datagrams with forged IPv6 sources sent as raw Ethernet frames, and an
unsolicited UDP flood at a client.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import time

from tests.support.netns import PYTHON, Host, in_netns, run_in

# Runs inside a namespace: one HTTP download per source address, all at once, for `seconds`,
# from the server address of the source's family; prints the bytes of body each received, and
# in all from `skip` seconds on (the steady state, once a token bucket's burst is spent).
MULTI_DOWNLOAD = r"""
import json, socket, sys, threading, time
servers, port, seconds = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])
sources, skip = json.loads(sys.argv[4]), float(sys.argv[5])
got = {s: 0 for s in sources}
late = [0]
lock = threading.Lock()
start = time.monotonic()
def one(src):
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    dst = next((h for h in servers if (":" in h) == (":" in src)), None)
    if dst is None:
        return
    try:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(seconds)  # a SYN the limit dropped is sent again
        s.bind((src, 0))
        s.connect((dst, port))
        s.settimeout(0.5)
        s.sendall(b"GET /bytes/1000000000 HTTP/1.0\r\nHost: x\r\n\r\n")
        head = b""
        while time.monotonic() - start < seconds:
            try:
                b = s.recv(65536)
            except socket.timeout:
                continue
            if not b:
                break
            if b"\r\n\r\n" not in head:
                head += b
                if b"\r\n\r\n" in head:
                    got[src] += len(head.split(b"\r\n\r\n", 1)[1])
                continue
            got[src] += len(b)
            if time.monotonic() - start >= skip:
                with lock:
                    late[0] += len(b)
        s.close()
    except OSError:
        pass
threads = [threading.Thread(target=one, args=(s,)) for s in sources]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"bytes": got, "late": late[0], "seconds": time.monotonic() - start}))
"""


def extra_addresses(host: Host, n: int, first: int = 200) -> tuple[list[str], list[str]]:
    """Give `host` n more IPv4 (10.77.1.first..) and n more IPv6 (fd77:1::c8:..) addresses on
    its LAN interface: one device, many source addresses."""
    v4 = [f"10.77.1.{first + i}" for i in range(n)]
    v6 = [f"fd77:1::c8:{i + 1:x}" for i in range(n)]
    lines = [f"addr add {a}/32 dev {host.ifname}" for a in v4]
    lines += [f"addr add {a}/128 dev {host.ifname} nodad" for a in v6]
    p = _ip_batch(host.ns, lines)
    if p.returncode != 0:
        raise RuntimeError(f"extra addresses: {p.stderr.strip()[:1000]}")
    return v4, v6


def drop_addresses(host: Host, addresses: list[str]) -> None:
    _ip_batch(host.ns, [f"addr del {a}/{128 if ':' in a else 32} dev {host.ifname}" for a in addresses])


def _ip_batch(ns: str, lines: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", capture_output=True,
                          text=True)


def multi_download(host: Host, servers: list[str], port: int, sources: list[str], seconds: float) -> dict[str, int]:
    """Bytes each source address of `host` received from one download each, all running at once
    for `seconds`, from the server address (of `servers`: IPv4, IPv6) of the source's family."""
    return _multi_download(host, servers, port, sources, seconds, seconds)["bytes"]


def steady_rate(host: Host, servers: list[str], port: int, sources: list[str], skip: float,
                seconds: float) -> float:
    """Bytes per second `host` received in all over `sources` (as multi_download) from `skip`
    seconds on to `skip + seconds`: the rate once a burst is spent."""
    got = _multi_download(host, servers, port, sources, skip + seconds, skip)
    return got["late"] / seconds


def _multi_download(host: Host, servers: list[str], port: int, sources: list[str], seconds: float,
                    skip: float) -> dict:
    p = run_in(host.ns, PYTHON, "-c", MULTI_DOWNLOAD, ",".join(servers), str(port), str(seconds), json.dumps(sources),
               str(skip), timeout=seconds + 30)
    return json.loads(p.stdout)


def mac_of(ns: str, ifname: str) -> str:
    out = run_in(ns, "ip", "-j", "link", "show", ifname).stdout
    return json.loads(out)[0]["address"]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp6_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An Ethernet frame with an IPv6 UDP datagram (checksum right: conntrack checks it)."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    length = 8 + len(payload)
    pseudo = s + d + struct.pack("!I3xB", length, 17)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip6 = struct.pack("!IHBB", 6 << 28, length, 17, 64) + s + d
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x86\xdd"
    return eth + ip6 + udp


def forged_udp6(host: Host, router_mac: str, sources: list[str], dst: str, dport: int, payload: bytes = b"x") -> int:
    """One UDP datagram to [dst]:dport from each of `sources` (addresses `host` does not hold),
    sent from `host`'s own MAC as raw frames (AF_PACKET): what an attacker forging IPv6 sources
    sends. Returns the frames sent."""
    assert host.mac is not None
    with in_netns(host.ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with s:
        s.bind((host.ifname, 0))
        for i, src in enumerate(sources):
            s.send(udp6_frame(host.mac, router_mac, src, dst, 40000 + i % 20000, dport, payload))
    return len(sources)


def udp_blast(ns: str, source: str, dst: str, port: int, seconds: float, size: int = 1000) -> int:
    """Datagrams of `size` bytes from `source` in `ns` to dst:port, as fast as they go, for
    `seconds` (an upload). Returns the bytes sent."""
    with in_netns(ns):
        s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    with s:
        s.bind((source, 0))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                sent += s.sendto(b"u" * size, (dst, port))
            except OSError:  # ENOBUFS, or an ICMP error reported on this send
                pass
    return sent


def udp_flood(ns: str, dst: str, port: int, count: int, size: int = 1000) -> int:
    """`count` datagrams of `size` bytes from `ns` to dst:port (nobody asked for them). Returns
    the bytes sent."""
    with in_netns(ns):
        s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        for _ in range(count):
            try:
                s.sendto(b"f" * size, (dst, port))
            except OSError:  # ICMP port unreachable reported on a later send: keep flooding
                pass
    return count * size
