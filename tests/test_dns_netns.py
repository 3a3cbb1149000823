"""DNS tunnels through the hotspot (issue 10, item 3), with real packets and real resolvers.

The router namespace runs dnsmasq as OpenWrt does (Debian's dnsmasq-base with the options
OpenWrt's init script renders) and the real `bitmesh serve` with its gate and its captive
resolver; upstream runs an authoritative server for `tunnel.test` that decodes what a tunnel
client (iodine-like: data up in long names, down in TXT answers) sends through the router's
resolver. What counts as carried is what the far end checked: up = bytes the authoritative
server decoded, down = bytes the client decoded (tests/support/dns.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from bitmesh.firewall.ruleset import CAPTIVE_DNS_PORT
from tests.support import dns
from tests.support.netns import Topology, run_in
from tests.support.router import RouterService, payers, router_services

pytestmark = [
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("dnsmasq"),
                       reason="needs root, nft and dnsmasq (dnsmasq-base)"),
]

PORTAL4, PORTAL6 = "10.77.1.1", "fd77:1::1"  # what the captive resolver answers: the router
UP4, UP6 = "10.77.2.2", "fd77:2::2"
GARDEN = "garden.test"
RECORDS = {
    "example.test": {"A": [UP4], "AAAA": [UP6]},
    GARDEN: {"A": [UP4], "AAAA": [UP6]},
}
# The names phones and laptops probe for a captive portal: they must land on the portal.
PROBES = ("connectivitycheck.gstatic.com", "captive.apple.com", "www.msftconnecttest.com", "detectportal.firefox.com")
LIMIT = 2000  # bytes/s a tunnel may carry for a client without access (the bound)


@pytest.fixture(scope="module")
def topo(bcoin, tmp_path_factory):
    with Topology(n_clients=3, gso=False) as t:
        t.bridge_tcp(t.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        t.zone = dns.ZoneServer(t, t.upstream.ns, tmp_path_factory.mktemp("zone"), records=RECORDS)
        t.dnsmasq([t.upstream.ipv4], rebind_ok=("test",))  # the owner's resolver, forwarding upstream
        dns53 = "meta l4proto { tcp, udp } th dport 53"
        t.install_counters(t.upstream.ns, {"dns_from_lan": f"ip saddr 10.77.1.0/24 {dns53}",
                                           "dns_from_lan6": f"ip6 saddr fd77:1::/64 {dns53}"})
        yield t


@pytest.fixture
def router(topo, bcoin, tmp_path):
    with router_services(topo) as started:
        def start(**options) -> RouterService:
            service = RouterService(topo, bcoin, tmp_path / f"router{len(started)}",
                                    {"walled_garden": f"{GARDEN}:443", **options}).start()
            started.append(service)
            return service

        yield start


@pytest.fixture
def pay(topo, faucet, tmp_path):
    with payers(topo, faucet, tmp_path) as start:
        yield start


def resolve(topo, host, name, qtype="A", server=PORTAL4, **kw) -> dict:
    return dns.run(topo, host.ns, "resolve", name=name, qtype=qtype, server=server, **kw)


def tunnel(topo, host, resolver=PORTAL4, seconds=3.0, **kw) -> dict:
    return dns.measure_tunnel(topo, host.ns, topo.zone, resolver, seconds=seconds, **kw)


def kernel_bytes(topo, host) -> int:
    """What the gate counted for `host` so far: its paid4/paid6 (up) and down4/down6 elements."""
    total = 0
    for name in ("paid4", "paid6", "down4", "down6"):
        p = run_in(topo.router.ns, "nft", "-j", "list", "set", "inet", "bitmesh", name)
        for obj in json.loads(p.stdout)["nftables"]:
            for e in obj.get("set", {}).get("elem", []):
                el = e["elem"]
                key = el["val"]
                addrs = [str(x) for x in key["concat"]] if isinstance(key, dict) else [str(key)]
                if host.ipv4 in addrs or host.ipv6 in addrs:
                    total += el.get("counter", {}).get("bytes", 0)
    return total


def wait_granted6(topo, host, timeout: float = 15.0) -> None:
    """Until the gate grants the paid device's IPv6 address (it learns it from the device's
    traffic and the neighbour table; meanwhile its DNS over IPv6 is captive, as unpaid)."""
    deadline = time.monotonic() + timeout
    while True:
        p = run_in(topo.router.ns, "nft", "list", "set", "inet", "bitmesh", "paid6")
        if f"{host.mac} . {host.ipv6} " in p.stdout:
            return
        assert time.monotonic() < deadline, f"{host.ipv6} never granted: {p.stdout}"
        resolve(topo, host, "example.test", server=PORTAL6, timeout=0.5)  # traffic for the gate to see
        time.sleep(0.5)


def assert_captive_dns(topo, host) -> None:
    """Every name answers with the portal (A and AAAA, over IPv4 and IPv6, UDP and TCP), the
    walled garden's names with their real addresses, and no name reaches the outside."""
    for server in (PORTAL4, PORTAL6):
        for name in ("example.test", *PROBES):
            assert resolve(topo, host, name, server=server)["answers"] == [PORTAL4], (server, name)
        assert resolve(topo, host, "example.test", "AAAA", server=server)["answers"] == [PORTAL6]
        assert resolve(topo, host, "example.test", server=server, tcp=True)["answers"] == [PORTAL4]
        assert resolve(topo, host, GARDEN, server=server)["answers"] == [UP4]
        assert resolve(topo, host, GARDEN, "AAAA", server=server)["answers"] == [UP6]
        # TXT (what a tunnel reads data from) of any name outside the garden: no data (REFUSED)
        got = resolve(topo, host, "x.example.test", "TXT", server=server)
        assert "error" not in got and got["answers"] == [] and got["types"] == []


def assert_no_tunnel(topo, host) -> None:
    """A tunnel session through the router's resolver (IPv4, IPv6) and through a resolver
    outside (port 53 forwarded) carries nothing: the authoritative server sees no query."""
    for resolver in (PORTAL4, PORTAL6, UP4, UP6):
        got = tunnel(topo, host, resolver, seconds=2.0)
        assert got["server_queries"] == 0 and got["up_bytes"] == 0 and got["down_bytes"] == 0, (resolver, got)
    # One tunnel query over TCP too, to the router and outside
    name, _ = dns.tunnel_name("tcp0", 0, topo.zone.zone)
    for server in (PORTAL4, UP4):
        got = resolve(topo, host, name, "TXT", server=server, tcp=True, timeout=1.0)
        assert got.get("answers", []) == []
    assert topo.zone.session("tcp0")["queries"] == 0


def test_unpaid_client_gets_captive_dns_that_carries_no_tunnel(topo, router):
    c, other = topo.clients[0], topo.clients[2]
    router()
    topo.reset_counters(topo.upstream.ns)
    before = topo.zone.stats()["queries"]
    # The attack of the issue: ~300 kB/s up and 500 kB/s down through the owner's dnsmasq before.
    got = tunnel(topo, c, PORTAL4, seconds=3.0)
    assert got["queries"] > 100  # the client did try hard
    assert got["up_bytes_per_s"] <= LIMIT and got["down_bytes_per_s"] <= LIMIT, got
    assert got["up_bytes"] == 0 and got["down_bytes"] == 0
    assert_no_tunnel(topo, c)
    assert_captive_dns(topo, c)
    # No DNS of an unpaid client left the router, except the garden names' lookups (by the owner's
    # dnsmasq, from the router's WAN address: none comes from a LAN address).
    counters = topo.read_counters(topo.upstream.ns, "packets")
    assert counters["dns_from_lan"] == 0 and counters["dns_from_lan6"] == 0
    tunnel_queries = topo.zone.stats()["queries"] - before
    assert tunnel_queries <= 8, tunnel_queries  # the garden lookups above (A/AAAA, 2 resolvers)
    # The captive resolver's port answers directly too, same bucket, same answers.
    assert resolve(topo, other, "example.test", port=CAPTIVE_DNS_PORT)["answers"] == [PORTAL4]


def test_captive_dns_flood_is_rate_limited_per_device(topo, router):
    """A flood of queries from one device gets its device's bucket (20/s after a burst of 60),
    and another device still resolves meanwhile."""
    flooder, other = topo.clients[0], topo.clients[2]
    router()
    time.sleep(0.5)
    # 3 s of a 64-deep window of tunnel queries: thousands sent, only the bucket's worth answered
    got = dns.run(topo, flooder.ns, "tunnel", server=PORTAL4, zone=topo.zone.zone, seconds=3.0, window=64,
                  timeout=0.05, limit=60)
    assert got["queries"] > 1000
    assert got["answers"] <= 60 + 20 * (got["seconds"] + 1), got
    assert got["down_bytes"] == 0
    assert resolve(topo, other, "example.test")["answers"] == [PORTAL4]


def test_paid_client_resolves_through_dnsmasq_and_its_dns_is_metered(topo, router, pay):
    c, unpaid = topo.clients[1], topo.clients[2]
    service = router(price_sat_per_mb=100)  # 500 sat a step buys 5 MB: the payer stays ahead
    payer = pay(service, 30_000, client=c)
    payer.wait_for(r"^paid \d+ sat")
    # Real answers, from the owner's dnsmasq (UDP and TCP)
    assert resolve(topo, c, "example.test")["answers"] == [UP4]
    assert resolve(topo, c, "example.test", "AAAA", tcp=True)["answers"] == [UP6]
    # ... and a paid client may tunnel (it pays for it): every byte of it is counted.
    counted = kernel_bytes(topo, c)
    got = tunnel(topo, c, PORTAL4, seconds=1.5, window=2)
    delta = kernel_bytes(topo, c) - counted
    assert got["up_bytes"] > 10_000 and got["down_bytes"] > 10_000
    assert delta >= got["up_bytes"] + got["down_bytes"], (delta, got)
    # Over IPv6 too, once the gate has granted the device's IPv6 address
    wait_granted6(topo, c)
    assert resolve(topo, c, "example.test", server=PORTAL6)["answers"] == [UP4]
    counted = kernel_bytes(topo, c)
    got = tunnel(topo, c, PORTAL6, seconds=1.0, window=2)
    assert kernel_bytes(topo, c) - counted >= got["up_bytes"] + got["down_bytes"] > 10_000
    assert_captive_dns(topo, unpaid)  # its neighbour still gets the captive resolver


def test_quota_exhausted_mid_tunnel_falls_back_to_captive_dns(topo, router, pay):
    """A paid client that stops paying and tunnels on: the tunnel is metered like any traffic,
    stops at the quota, and from then on the client gets captive DNS."""
    c = topo.clients[1]
    # One payment of the whole deposit: 5000 sat at 10 000 sat/MB buys 500 000 bytes.
    service = router(price_sat_per_mb=10_000, prepay_step_sat=5_000, min_deposit_sat=5_000)
    payer = pay(service, 5_000, client=c)
    payer.wait_for(r"^paid 5000 sat")
    payer.kill()  # the channel stays open, paid up to its quota
    assert resolve(topo, c, "example.test")["answers"] == [UP4]
    got = tunnel(topo, c, PORTAL4, seconds=4.0)
    assert 0 < got["up_bytes"] + got["down_bytes"] < 500_000, got
    assert kernel_bytes(topo, c) <= 500_000
    # Cut off: captive DNS, no tunnel, over IPv4 and IPv6
    assert_no_tunnel(topo, c)
    assert_captive_dns(topo, c)
    assert kernel_bytes(topo, c) <= 500_000


def test_expired_client_falls_back_to_captive_dns(topo, router, pay):
    c = topo.clients[1]
    # 60 000 sat/minute = 1000 sat/s: one payment of the whole 4000 sat deposit buys 4 s.
    service = router(price_sat_per_mb=0, price_sat_per_minute=60_000, prepay_step_sat=4_000, min_deposit_sat=4_000)
    payer = pay(service, 4_000, client=c)
    payer.wait_for(r"^paid 4000 sat")
    paid_at = time.monotonic()
    assert resolve(topo, c, "example.test")["answers"] == [UP4]
    time.sleep(max(0.0, paid_at + 6.0 - time.monotonic()))
    assert_no_tunnel(topo, c)
    assert_captive_dns(topo, c)
