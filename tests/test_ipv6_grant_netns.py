"""A dual-stack client pays over IPv4; its IPv6 addresses are granted with it (issue 10, item 6).

The real `bitmesh serve` in a router namespace and a real `bitmesh pay` in a client namespace,
on a bcoin regtest node. The channel names one address (IPv4 here); the device's other
addresses are the ones the kernel's neighbour table binds to its MAC: its SLAAC address, and
a privacy address it takes after paying. Each is granted bound to that MAC, counted on the
device's grant, and nothing of another device using the same address gets through.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from tests.support.netns import Topology, run_in
from tests.support.router import Payer, RouterService

pytestmark = [
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

PRIVACY = "fd77:1::9a3c:51ff:fe00:1234"  # a privacy address client 1 takes after paying
UP6 = "fd77:2::2"


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=2, gso=False) as t:
        t.bridge_tcp(t.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        t.http_server(t.upstream.ns, "UPSTREAM", [80, 8080])
        t.install_counters(t.upstream.ns, {"from_privacy": f"ip6 saddr {PRIVACY}"})
        yield t


def wait_until(check, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def connects(topo, host, source: str | None = None) -> bool:
    return topo.call(host.ns, "tcp_connect", UP6, 8080, source=source)["ok"]


def paid6(topo) -> dict[tuple[str, str], int]:
    """(MAC, IPv6 address) -> bytes counted, of the gate's `paid6` set."""
    out = run_in(topo.router.ns, "nft", "-j", "list", "set", "inet", "bitmesh", "paid6").stdout
    elems = next(o["set"] for o in json.loads(out)["nftables"] if "set" in o).get("elem", [])
    got = {}
    for e in elems:
        e = e.get("elem", e)
        mac, addr = e["val"]["concat"]
        got[(mac, addr)] = e.get("counter", {}).get("bytes", 0)
    return got


def test_dual_stack_client_gets_its_ipv6_addresses_with_its_ipv4(topo, bcoin, faucet, tmp_path):
    c, other = topo.clients
    service = RouterService(topo, bcoin, tmp_path / "router").start()
    payer = None
    try:
        assert not connects(topo, c)  # unpaid: IPv6 captive like IPv4
        payer = Payer(topo, c, service, faucet, 30_000, tmp_path / "payer")
        payer.wait_for(r"^paid \d+ sat")
        assert topo.call(c.ns, "http_get", "http://10.77.2.2:8080/")["body"] == "UPSTREAM"
        # Its SLAAC address: granted within a meter pass or two of its first packet.
        assert wait_until(lambda: connects(topo, c)), "the paid device's IPv6 address stayed captive"
        got = topo.call(c.ns, "download", f"http://[{UP6}]:8080/bytes/300000")
        assert got == {"bytes": 300000, "complete": True}
        assert paid6(topo)[(c.mac, c.ipv6)] > 0  # bound to its MAC and counted on its grant

        # A privacy address taken after paying: granted too, bound to the same MAC.
        run_in(c.ns, "ip", "-6", "addr", "add", f"{PRIVACY}/64", "dev", c.ifname, "nodad")
        assert wait_until(lambda: connects(topo, c, PRIVACY)), "the privacy address stayed captive"
        assert (c.mac, PRIVACY) in paid6(topo)

        # Another device (unpaid) using the same address gets nothing through.
        run_in(c.ns, "ip", "-6", "addr", "del", f"{PRIVACY}/64", "dev", c.ifname)
        run_in(other.ns, "ip", "-6", "addr", "add", f"{PRIVACY}/64", "dev", other.ifname, "nodad")
        try:
            topo.reset_counters(topo.upstream.ns)
            for _ in range(3):
                assert not connects(topo, other, PRIVACY)
            assert topo.read_counters(topo.upstream.ns, "packets")["from_privacy"] == 0
            assert not any(mac == other.mac for mac, _ in paid6(topo))
        finally:
            run_in(other.ns, "ip", "-6", "addr", "del", f"{PRIVACY}/64", "dev", other.ifname, check=False)
        assert not connects(topo, other)  # and its own address stays captive
    finally:
        if payer is not None:
            payer.kill()
        service.stop()
        run_in(topo.router.ns, "ip", "neigh", "flush", "dev", topo.LAN)
