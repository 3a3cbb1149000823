"""Resale bench figure: two hops, both routers the real `bitmesh serve` (firewall on), one bcoin
regtest node of its own (needs root). The layout of tests/test_resale_netns.py:

    client -- reseller router (uplink mode) -- upstream router -- internet (UDP echo)

resale.pay_to_access_ms
    The reseller's uplink channel is open and paid ahead (its wallet funded, its first pass done).
    A captured client with a funded channel to the reseller sends a UDP probe to the echo in the
    internet namespace every 1 ms, then POSTs its first payment; the figure is the time from the
    start of that POST to the first echo coming back through both routers (the reseller's gate
    opening; the upstream's is open already for the reseller). The channel is then closed and the
    next run opens a new one. Median of RUNS runs, `_min` and `_max` its spread (bench/portal.py's
    payer script, the same measure as portal.pay_to_access_ms over one hop).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.portal import _PAY_TO_ACCESS
from bitmesh.uplink.wallet import UplinkWallet
from tests.support.coins import NETWORK
from tests.support.netns import Topology
from tests.support.router import RouterService, funding_key, portal_call, python_in, regtest

RUNS = 9
DEPOSIT = 20_000


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="bitmesh-bench-") as tmp, \
            regtest(Path(tmp) / "bcoin") as (node, faucet), Topology(n_clients=1, gso=False) as topo:
        work = Path(tmp)
        inet = topo.internet_behind_upstream()
        for ns in (topo.router.ns, topo.upstream.ns):
            topo.bridge_tcp(ns, node.rpc_port, ("127.0.0.1", node.rpc_port))
        topo.udp_echo(inet.ns, [7])
        started: list[RouterService] = []
        try:
            upstream = RouterService(topo, node, work / "upstream", {
                "interface": topo.upstream.ifname, "price_sat_per_mb": 1000, "prepay_step_sat": 2000,
                "min_deposit_sat": 2000}, host=topo.upstream).start()
            started.append(upstream)
            seed = os.urandom(32)
            state = work / "reseller" / "state"
            state.mkdir(parents=True)
            fd = os.open(state / "seed", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, seed.hex().encode() + b"\n")
            os.close(fd)
            faucet.pay(UplinkWallet(seed, None, NETWORK).script, 200_000)
            reseller = RouterService(topo, node, work / "reseller", {
                "price_sat_per_mb": 1, "uplink_enabled": 1, "uplink_portal": upstream.url,
                "uplink_margin_percent": 20, "uplink_budget_sat": 1_000_000, "uplink_deposit_sat": 100_000,
            }).start()
            started.append(reseller)
            client = topo.clients[0]
            deadline = time.monotonic() + 30
            while portal_call(client.ns, reseller.url, "offer").get("tariff", {}).get("sat_per_mb") != 1200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the reseller never started selling")
                time.sleep(0.2)
            coins = [funding_key(faucet, DEPOSIT + 3_000) for _ in range(RUNS)]
            out = python_in(client.ns, _PAY_TO_ACCESS, reseller.url, inet.ipv4, "7", str(DEPOSIT),
                            reseller.payout_address, json.dumps(coins), timeout=180)
            runs = json.loads(out.stdout)
            if None in runs:
                raise RuntimeError(f"a paid client never got through two hops: {runs}")
        finally:
            for service in reversed(started):
                service.stop()
    return {
        "resale.pay_to_access_ms": round(statistics.median(runs), 1),
        "resale.pay_to_access_ms_min": round(min(runs), 1),
        "resale.pay_to_access_ms_max": round(max(runs), 1),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
