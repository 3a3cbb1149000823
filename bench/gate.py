"""The gate at 200 paid devices (issue 10 soak): what a payment and an IPv6 sync pass cost.

200 devices in `table inet bitmesh` in a router namespace, each with a byte quota, its IPv4
address and two learned IPv6 addresses (what the soak's dual-stack clients hold).

gate.payments_per_s_200
    Gate.update_quota calls a second (a payment raising a device's allowance, one device after
    another as the manager's lock makes them): the kernel part of a payment.
gate.sync_pass_ms_200
    One Gate.sync_addresses pass in which every device's learned IPv6 addresses change (two
    taken back, two new ones granted): the worst pass the meter can meet.
gate.list_table_ms_200, gate.list_set_ms_200, gate.list_quota_ms_200
    `nft -j list table inet bitmesh` against `nft -j list set ... paid4` and `nft -j list quota
    ... <one device's>` at that size (nft 1.0.6 builds its object cache for the quota: no cheaper
    than half the table), the reads a change can choose from.
Every figure is the median of ROUNDS rounds, with [lowest, highest] in `*_spread`; the rounds
of the figures are interleaved.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time

from bitmesh.firewall import FirewallConfig, Gate, Nft, PaidClient
from bitmesh.firewall.ruleset import quota_name
from tests.support.netns import Topology

DEVICES = 200
ROUNDS = 7
PAYMENTS = 50  # update_quota calls per round


def _mac(i: int) -> str:
    return f"02:56:00:00:{i // 256:02x}:{i % 256:02x}"


def _v6(i: int, gen: int, k: int) -> str:
    return f"fd77:1::{i + 0x100:x}:{gen:x}{k}"


def _neighbours(gen: int) -> list[tuple[str, str]]:
    return [(_v6(i, gen, k), _mac(i)) for i in range(DEVICES) for k in (1, 2)]


def _ms(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return (time.perf_counter() - t0) * 1000


def _summary(name: str, values: list[float], digits: int = 1) -> dict[str, object]:
    return {name: round(statistics.median(values), digits),
            f"{name}_spread": [round(min(values), digits), round(max(values), digits)]}


def run() -> dict[str, object]:
    if os.geteuid() != 0 or not shutil.which("nft"):
        return {"gate.skipped": "needs root and nft (network namespaces)"}
    with Topology(n_clients=1) as topo:
        argv = topo.nft_argv()
        gate = Gate(FirewallConfig(lan_interface=topo.LAN, router_ipv4=topo.router.ipv4,
                                   router_ipv6=topo.router.ipv6), Nft(argv))
        quota = {i: 10**9 for i in range(DEVICES)}
        gate.start([PaidClient(_mac(i), ipv4=f"10.77.{100 + i // 200}.{i % 200 + 1}", quota_bytes=quota[i])
                    for i in range(DEVICES)])
        gate.sync_addresses(_neighbours(0))
        figures: dict[str, list[float]] = {k: [] for k in ("pay", "sync", "table", "set", "quota")}
        for r in range(1, ROUNDS + 1):
            t0 = time.perf_counter()
            for n in range(PAYMENTS):
                i = (r * PAYMENTS + n) % DEVICES
                quota[i] += 10**6
                gate.update_quota(_mac(i), quota_bytes=quota[i])
            figures["pay"].append(PAYMENTS / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            changed = gate.sync_addresses(_neighbours(r))
            figures["sync"].append((time.perf_counter() - t0) * 1000)
            assert len(changed) == DEVICES, len(changed)
            figures["table"].append(_ms([*argv, "-j", "list", "table", "inet", "bitmesh"]))
            figures["set"].append(_ms([*argv, "-j", "list", "set", "inet", "bitmesh", "paid4"]))
            figures["quota"].append(_ms([*argv, "-j", "list", "quota", "inet", "bitmesh", quota_name(_mac(r))]))
        gate.stop()
    return {
        **_summary("gate.payments_per_s_200", figures["pay"]),
        **_summary("gate.sync_pass_ms_200", figures["sync"], 0),
        **_summary("gate.list_table_ms_200", figures["table"]),
        **_summary("gate.list_set_ms_200", figures["set"]),
        **_summary("gate.list_quota_ms_200", figures["quota"]),
        "gate.rounds": ROUNDS,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
