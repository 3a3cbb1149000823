"""Portal bench figures, against the real service (`bitmesh serve`, firewall on) in the router
namespace of a three-namespace topology, with a bcoin regtest node of its own (needs root).

portal.pay_to_access_ms
    A captured client with a funded channel sends a UDP probe to an upstream echo every 1 ms,
    then POSTs its first payment; the figure is the time from the start of that POST to the
    first echo coming back (the first packet forwarded, plus one LAN round trip of ~0.1 ms).
    The channel is then closed (access revoked) and the next run opens a new one. Median of
    RUNS runs; `portal.pay_to_access_ms_max` is the slowest.
portal.p99_ms_50_clients
    The splash page (`GET /`) from 50 concurrent clients (threads of a load generator in the
    client namespace, so requests cross the firewall as a phone's would), 40 requests each, a
    new connection per request; p99 of the 2000 latencies. `portal.p50_ms_50_clients` too.
portal.service_rss_kb
    Resident memory of the `bitmesh serve` process (VmRSS, x86-64 CPython) right after that
    load, and `portal.service_rss_peak_kb` its high-water mark (VmHWM) over the whole bench.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from tests.support.netns import Topology
from tests.support.router import RouterService, funding_key, python_in, regtest

RUNS = 7
DEPOSIT = 20_000

_PAY_TO_ACCESS = r"""
import json, socket, sys, threading, time
from bitmesh.chain.address import p2wpkh_script
from bitmesh.paycli import parse_coin, parse_key
from bitmesh.paying import PayerSession
from bitmesh.portal.client import PortalClient

portal_url, echo_host, echo_port, deposit, refund_address = sys.argv[1:6]
portal = PortalClient(portal_url)
results = []
for key_hex, coin_text in json.loads(sys.argv[6]):
    session = PayerSession(portal, lambda: int(portal.offer()["tip_height"]), refund_address)
    session.open(int(deposit))
    key = parse_key(key_hex)
    session.fund_from_coins([parse_coin(coin_text, key)], p2wpkh_script(key.pub))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2.0)
    stop = threading.Event()
    def probe():
        while not stop.is_set():
            s.sendto(b"p", (echo_host, int(echo_port)))
            time.sleep(0.001)
    threading.Thread(target=probe, daemon=True).start()
    time.sleep(0.05)  # captured: no echo comes back
    t0 = time.perf_counter()
    session.pay_for(0)
    try:
        while s.recv(64) != b"p":
            pass
        results.append((time.perf_counter() - t0) * 1000)
    except OSError:
        results.append(None)
    stop.set()
    session.close()
print(json.dumps(results))
"""

_LOAD = r"""
import http.client, json, sys, threading, time
host, port, clients, per_client = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lat, errors = [], []
start = threading.Barrier(clients)
def worker():
    start.wait()
    for _ in range(per_client):
        t = time.perf_counter()
        try:
            c = http.client.HTTPConnection(host, port, timeout=10)
            c.request("GET", "/")
            r = c.getresponse()
            r.read()
            c.close()
            if r.status != 200:
                errors.append(r.status)
                continue
        except OSError as e:
            errors.append(repr(e))
            continue
        lat.append((time.perf_counter() - t) * 1000)
threads = [threading.Thread(target=worker) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
lat.sort()
print(json.dumps({"p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99) - 1], "n": len(lat), "errors": errors[:5],
                  "n_errors": len(errors)}))
"""


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="bitmesh-bench-") as tmp, \
            regtest(Path(tmp) / "bcoin") as (node, faucet), Topology(n_clients=1, gso=False) as topo:
        client, up = topo.clients[0], topo.upstream
        topo.bridge_tcp(topo.router.ns, node.rpc_port, ("127.0.0.1", node.rpc_port))
        topo.udp_echo(up.ns, [7])
        service = RouterService(topo, node, Path(tmp) / "router", {"price_sat_per_mb": 1000}).start()
        try:
            coins = [funding_key(faucet, DEPOSIT + 3_000) for _ in range(RUNS)]
            out = python_in(client.ns, _PAY_TO_ACCESS, service.url, up.ipv4, "7", str(DEPOSIT),
                            service.payout_address, json.dumps(coins), timeout=120)
            runs = json.loads(out.stdout)
            if None in runs:
                raise RuntimeError(f"a paid client never got through: {runs}")
            load = json.loads(python_in(client.ns, _LOAD, topo.router.ipv4, str(service.port), "50", "40",
                                        timeout=300).stdout)
            if load["n_errors"]:
                raise RuntimeError(f"splash page errors under load: {load}")
            memory = _memory_kb(service.proc.pid)
        finally:
            service.stop()
    return {
        "portal.pay_to_access_ms": round(statistics.median(runs), 1),
        "portal.pay_to_access_ms_max": round(max(runs), 1),
        "portal.p99_ms_50_clients": round(load["p99"], 1),
        "portal.p50_ms_50_clients": round(load["p50"], 1),
        "portal.service_rss_kb": memory["VmRSS"],
        "portal.service_rss_peak_kb": memory["VmHWM"],
    }


def _memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB (`ip netns exec` execs the service: same pid)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
