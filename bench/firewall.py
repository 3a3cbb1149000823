"""Firewall bench figures (real kernel, network namespaces; needs root, nft, iperf3).

firewall.forward_throughput_ratio
    iperf3 download throughput (upstream -> client, through the router namespace) with
    `table inet bitmesh` loaded and 250 paid clients in its sets (the measuring client one of
    them, with a byte quota, so every packet goes through the quota and counter lookups),
    divided by the same with no bitmesh table. Same topology, same run, arms alternated
    A/B/A/B... to spread drift and noise over both. Both arms carry a minimal stand-in for
    OpenWrt's fw4 (`table inet fw4` with conntrack), because a real router always runs it:
    the ratio is the price of adding bitmesh to a router, not of conntrack itself.
    `firewall.forward_throughput_ratio_no_fw4` is the same ratio with no other table at all.
firewall.quota_overshoot_bytes
    Bytes delivered (counted at both endpoints) past a 1 MB byte quota during a 10 MB
    download, GSO capped at one segment so the router sees wire packets. 0 is the design:
    the kernel drops the packet that would cross the quota. `firewall.quota_undershoot_bytes`
    says how far below the quota the cut came (< one packet).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time

from bitmesh.firewall import FirewallConfig, Gate, Nft, PaidClient
from tests.support.netns import Topology, run_in

FW4_STUB = """table inet fw4 {
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tct state established,related accept
\t}
\tchain srcnat {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t}
}
"""


def _clients(topo: Topology) -> list[PaidClient]:
    c = topo.clients[0]
    fakes = [
        PaidClient(
            f"02:55:00:00:{i // 256:02x}:{i % 256:02x}",
            ipv4=f"10.77.{100 + i // 200}.{i % 200 + 1}",
            ipv6=(f"fd77:1::{i + 0x100:x}",),
            quota_bytes=10**12,
        )
        for i in range(249)
    ]
    return [*fakes, PaidClient(c.mac, ipv4=c.ipv4, ipv6=(c.ipv6,), quota_bytes=10**12)]


def _iperf(topo: Topology, seconds: float) -> float:
    p = run_in(
        topo.clients[0].ns, "iperf3", "-c", topo.upstream.ipv4, "-R", "-t", str(seconds), "-J",
        timeout=seconds + 30,
    )
    return float(json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"])


def _wait_port(topo: Topology, port: int) -> None:
    for _ in range(100):
        if topo.call(topo.clients[0].ns, "tcp_connect", topo.upstream.ipv4, port)["ok"]:
            return
        time.sleep(0.05)
    raise RuntimeError("iperf3 server did not start")


def _ratio(topo: Topology, gate: Gate, clients: list[PaidClient], seconds: float, rounds: int) -> dict:
    without, with_table = [], []
    for _ in range(rounds):
        gate.stop()
        without.append(_iperf(topo, seconds))
        gate.start(clients)
        with_table.append(_iperf(topo, seconds))
    gate.stop()
    return {
        "ratio": statistics.mean(with_table) / statistics.mean(without),
        "without_gbps": statistics.mean(without) / 1e9,
        "with_gbps": statistics.mean(with_table) / 1e9,
    }


def throughput(seconds: float = 2.0, rounds: int = 3) -> dict:
    with Topology(n_clients=1) as topo:
        topo.spawn(topo.upstream.ns, "iperf3", "-s", "-B", topo.upstream.ipv4, ready=None)
        _wait_port(topo, 5201)
        cfg = FirewallConfig(lan_interface=topo.LAN, router_ipv4=topo.router.ipv4, router_ipv6=topo.router.ipv6)
        gate = Gate(cfg, Nft(topo.nft_argv()))
        clients = _clients(topo)
        bare = _ratio(topo, gate, clients, seconds, 1)
        run_in(topo.router.ns, "nft", "-f", "-", input=FW4_STUB)
        fw4 = _ratio(topo, gate, clients, seconds, rounds)
    return {
        "firewall.forward_throughput_ratio": round(fw4["ratio"], 3),
        "firewall.forward_gbps_without_table": round(fw4["without_gbps"], 2),
        "firewall.forward_gbps_with_table": round(fw4["with_gbps"], 2),
        "firewall.forward_throughput_ratio_no_fw4": round(bare["ratio"], 3),
    }


def overshoot(quota: int = 1_000_000) -> dict:
    with Topology(n_clients=1, gso=False) as topo:
        c, u = topo.clients[0], topo.upstream
        topo.http_server(u.ns, "UPSTREAM", [8080])
        topo.install_counters(u.ns, {"up": f"ip saddr {c.ipv4}"})
        topo.install_counters(c.ns, {"down": f"ip saddr {u.ipv4}"})
        cfg = FirewallConfig(lan_interface=topo.LAN, router_ipv4=topo.router.ipv4, router_ipv6=topo.router.ipv6)
        gate = Gate(cfg, Nft(topo.nft_argv()))
        gate.start([PaidClient(c.mac, ipv4=c.ipv4, quota_bytes=quota)])
        try:
            topo.call(c.ns, "download", f"http://{u.ipv4}:8080/bytes/{10 * quota}")
            delivered = topo.read_counters(u.ns)["up"] + topo.read_counters(c.ns)["down"]
        finally:
            gate.stop()
    return {
        "firewall.quota_overshoot_bytes": max(0, delivered - quota),
        "firewall.quota_undershoot_bytes": max(0, quota - delivered),
    }


def run() -> dict:
    out = throughput()
    out.update(overshoot())
    return out


if __name__ == "__main__":
    try:
        print(json.dumps(run(), indent=2))
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"bench failed: {e.stderr}") from e
