"""Walled-garden bench (real kernel, network namespaces; needs root and nft).

garden.bytes_per_s_per_device
    What one unpaid device downloads from a walled-garden host:port per second while it uses many
    source addresses at once: its own IPv4 and IPv6 address and 16 more of each, 34 parallel
    downloads. Measured at the device, in all, over 8 s that start 2 s after the downloads did
    (once the bucket's burst, what any device gets once up front, is spent). The garden's limit
    is per device (MAC), so this stays at the configured `garden.limit_bytes_per_s` (at most 10 %
    over it); under the old per-address limit it was the limit times the addresses (16
    addresses: 1.46 MB/s).
garden.bytes_per_s_per_device_runs
    The figure of each run (median reported), `garden.addresses_per_device` how many source
    addresses the device used.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from dataclasses import replace

from bitmesh.firewall import FirewallConfig, Gate, Nft
from tests.support.garden import drop_addresses, extra_addresses, steady_rate
from tests.support.netns import Topology

GARDEN_PORT = 8333
EXTRA = 16  # source addresses per family besides the device's own


def run(rounds: int = 3, skip: float = 2.0, seconds: float = 8.0) -> dict:
    with Topology(n_clients=1) as topo:
        c, u = topo.clients[0], topo.upstream
        topo.http_server(u.ns, "GARDEN", [GARDEN_PORT])
        cfg = FirewallConfig(lan_interface=topo.LAN, router_ipv4=topo.router.ipv4, router_ipv6=topo.router.ipv6,
                             garden=((u.ipv4, GARDEN_PORT), (u.ipv6, GARDEN_PORT)))
        gate = Gate(cfg, Nft(topo.nft_argv()))
        gate.start([])
        v4, v6 = extra_addresses(c, EXTRA)
        sources = [c.ipv4, c.ipv6, *v4, *v6]
        rates = []
        try:
            for _ in range(rounds):
                gate.reload(replace(cfg))  # a fresh table: new buckets, nothing carried between runs
                rates.append(steady_rate(c, [u.ipv4, u.ipv6], GARDEN_PORT, sources, skip, seconds))
        finally:
            drop_addresses(c, v4 + v6)
            gate.stop()
    limit = cfg.garden_rate_kbytes * 1024
    return {
        "garden.bytes_per_s_per_device": round(statistics.median(rates)),
        "garden.bytes_per_s_per_device_runs": [round(r) for r in rates],
        "garden.limit_bytes_per_s": limit,
        "garden.addresses_per_device": len(sources),
    }


if __name__ == "__main__":
    try:
        print(json.dumps(run(), indent=2))
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"bench failed: {e.stderr}") from e
