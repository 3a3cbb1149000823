"""DNS bench figures (issue 10, item 3; real kernel, network namespaces; needs root, nft, dnsmasq).

The router namespace runs the owner's resolver (dnsmasq with OpenWrt's default options,
forwarding upstream), the gate (`table inet bitmesh`) and the captive resolver exactly as the
service runs it (`captive_dns.dnsmasq_argv`); upstream, an authoritative server for the tunnel
zone; clients run an iodine-like tunnel (tests/support/dns.py: data up in long names, down in
TXT answers, 16 queries in flight). Carried bytes are what the far end checked.

dns.unpaid_tunnel_bytes_per_s
    Bytes/s (up + down) a tunnel carries for a client without access: the highest of the runs
    through the router's resolver (IPv4, IPv6) and through an outside resolver (port 53
    forwarded), TUNNEL_S seconds each. Target at most 2000.
dns.cutoff_tunnel_bytes_per_s
    The same for a paid client after its byte quota ran out (its first tunnel ate it).
dns.paid_tunnel_bytes_per_s
    The tunnel of a paid client through the owner's dnsmasq (allowed, metered): what every
    client got before the captive resolver; `dns.paid_tunnel_metered_ratio` is the gate's count
    of that client's bytes over the tunnel's payload (>= 1: no DNS byte goes uncounted).
dns.captive_p50_ms, dns.captive_p99_ms, dns.owner_p50_ms
    Answer times of the captive resolver (a name it answers with the portal) and of the owner's
    resolver (the same name, asked of the authoritative server upstream: TTL 0, no cache),
    LATENCY_N queries each at 15/s, one device.
dns.captive_flood_answers_per_s
    Answers one device gets from the captive resolver while it floods it (64 queries in flight
    for FLOOD_S seconds): the gate's per-device bucket (20/s after a burst of 60).
dns.captive_rss_kb, dns.captive_cpu_percent_flood
    The captive resolver's cost: its dnsmasq's VmRSS after all of the above, and its CPU (user +
    system, % of one core) while all three client devices flood it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bitmesh.firewall import FirewallConfig, Gate, Nft, PaidClient
from bitmesh.firewall.captive_dns import CaptiveDns, _unprivileged_user, dnsmasq_argv, find_dnsmasq
from tests.support import dns
from tests.support.netns import Topology, _dns_answers, run_in

TUNNEL_S = 5.0
FLOOD_S = 5.0
LATENCY_N = 60
RECORDS = {"example.test": {"A": ["10.77.2.2"]}}


def _tunnel(topo: Topology, zone: dns.ZoneServer, host, resolver: str, seconds: float = TUNNEL_S) -> dict:
    got = dns.measure_tunnel(topo, host.ns, zone, resolver, seconds=seconds)
    return {**got, "bytes_per_s": got["up_bytes_per_s"] + got["down_bytes_per_s"]}


def _latency(topo: Topology, host, name: str, server: str) -> list[float]:
    code = (
        "import json, sys, time\n"
        f"sys.path.insert(0, {str(Path(dns.__file__).parent)!r})\n"
        "import dns\n"
        "out = []\n"
        f"for _ in range({LATENCY_N}):\n"
        "    t0 = time.perf_counter()\n"
        f"    r = dns.resolve({name!r}, server={server!r}, timeout=1.0)\n"
        "    if 'error' not in r and r['answers']:\n"
        "        out.append((time.perf_counter() - t0) * 1000)\n"
        "    time.sleep(max(0.0, 1 / 15 - (time.perf_counter() - t0)))\n"
        "print(json.dumps(out))\n"
    )
    ms = json.loads(run_in(host.ns, sys.executable, "-c", code, timeout=120).stdout)
    if len(ms) < LATENCY_N * 0.9:
        raise RuntimeError(f"{server}: only {len(ms)} of {LATENCY_N} queries answered")
    return sorted(ms)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run() -> dict:
    binary = find_dnsmasq()
    if binary is None or os.geteuid() != 0:
        return {"dns.skipped": "needs root and dnsmasq (dnsmasq-base)"}
    out: dict[str, object] = {}
    with Topology(n_clients=3) as topo, tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        zone = dns.ZoneServer(topo, topo.upstream.ns, Path(tmp), records=RECORDS)
        topo.dnsmasq([topo.upstream.ipv4], rebind_ok=("test",))
        config = FirewallConfig(lan_interface=topo.LAN, router_ipv4=topo.router.ipv4, router_ipv6=topo.router.ipv6,
                                portal_port=2050)
        gate = Gate(config, Nft(topo.nft_argv()))
        gate.start([])
        captive = topo.spawn(topo.router.ns, *dnsmasq_argv(binary, CaptiveDns.of(config), _unprivileged_user()),
                             ready=None)
        deadline = time.monotonic() + 10
        while not _dns_answers(topo.router.ns, (topo.router.ipv4, config.captive_dns_port)):
            if captive.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("captive dnsmasq did not start")
            time.sleep(0.05)
        try:
            unpaid, paid, third = topo.clients
            r = topo.router
            runs = [_tunnel(topo, zone, unpaid, s) for s in (r.ipv4, r.ipv6, topo.upstream.ipv4)]
            out["dns.unpaid_tunnel_bytes_per_s"] = round(max(x["bytes_per_s"] for x in runs), 1)
            out["dns.unpaid_tunnel_queries_sent"] = sum(x["queries"] for x in runs)

            # A paid client: through the owner's dnsmasq, metered.
            gate.allow(PaidClient(paid.mac, ipv4=paid.ipv4, ipv6=(paid.ipv6,), quota_bytes=10**12))
            before = gate.usage()[paid.mac]
            got = _tunnel(topo, zone, paid, r.ipv4)
            after = gate.usage()[paid.mac]
            counted = after.total - before.total
            out["dns.paid_tunnel_bytes_per_s"] = round(got["bytes_per_s"], 1)
            out["dns.paid_tunnel_metered_ratio"] = round(counted / max(1, got["up_bytes"] + got["down_bytes"]), 3)

            # The same client with a 300 kB quota: the first tunnel eats it, the second gets nothing.
            gate.update_quota(paid.mac, quota_bytes=after.total + 300_000)
            _tunnel(topo, zone, paid, r.ipv4, seconds=3.0)
            cut = [_tunnel(topo, zone, paid, s) for s in (r.ipv4, r.ipv6, topo.upstream.ipv4)]
            out["dns.cutoff_tunnel_bytes_per_s"] = round(max(x["bytes_per_s"] for x in cut), 1)

            captive_ms = _latency(topo, third, "example.test", r.ipv4)
            gate.allow(PaidClient(third.mac, ipv4=third.ipv4, quota_bytes=10**12))
            owner_ms = _latency(topo, third, "example.test", r.ipv4)  # the owner's dnsmasq asks upstream
            gate.revoke(third.mac)
            q = statistics.quantiles(captive_ms, n=100)
            out["dns.captive_p50_ms"] = round(statistics.median(captive_ms), 3)
            out["dns.captive_p99_ms"] = round(q[98], 3)
            out["dns.owner_p50_ms"] = round(statistics.median(owner_ms), 3)

            flood = dns.run(topo, unpaid.ns, "tunnel", server=r.ipv4, zone=zone.zone, seconds=FLOOD_S, window=64,
                            timeout=0.05, limit=FLOOD_S + 60)
            out["dns.captive_flood_queries_per_s"] = round(flood["queries"] / flood["seconds"], 1)
            out["dns.captive_flood_answers_per_s"] = round(flood["answers"] / flood["seconds"], 1)

            time.sleep(10)  # the flooder's bucket expires; now all three devices flood at once
            t0, ticks0 = time.monotonic(), _cpu_ticks(captive.pid)
            procs = [subprocess.Popen(["ip", "netns", "exec", h.ns, sys.executable, dns.SCRIPT.as_posix(), "tunnel",
                                       json.dumps({"server": r.ipv4, "zone": zone.zone, "seconds": FLOOD_S,
                                                   "window": 64, "timeout": 0.05})],
                                      stdout=subprocess.DEVNULL) for h in topo.clients]
            for p in procs:
                p.wait(FLOOD_S + 60)
            took = time.monotonic() - t0
            ticks = _cpu_ticks(captive.pid) - ticks0
            out["dns.captive_cpu_percent_flood"] = round(100 * ticks / os.sysconf("SC_CLK_TCK") / took, 2)
            out["dns.captive_rss_kb"] = _rss_kb(captive.pid)
        finally:
            gate.stop()
    return out


if __name__ == "__main__":
    try:
        print(json.dumps(run(), indent=2))
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"bench failed: {e.stderr}") from e
