"""The gate with real kernel packets: client, router and upstream network namespaces.

Traffic stays inside namespaces created here (10.77.x.x, fd77::). Byte measurements use nft
counters in the client and upstream namespaces (what was actually delivered), independent of
the router's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import replace

import pytest

from bitmesh.firewall import FirewallConfig, Gate, Nft, PaidClient
from bitmesh.firewall.ruleset import CAPTIVE_DNS_PORT
from tests.support.garden import (
    drop_addresses,
    extra_addresses,
    forged_udp6,
    mac_of,
    multi_download,
    udp_blast,
    udp_flood,
)
from tests.support.netns import Topology, run_in
from tests.support.router import gate_in

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

PORTAL_PORT = 2050
SINK = 9999  # upstream UDP port with no listener: arrivals are counted, never answered
MTU_PACKET = 1500
OTHER4, OTHER6 = "10.77.2.3", "fd77:2::3"  # an upstream host outside the walled garden
CLIENT_SINK = 9998  # a port nothing listens on in the clients


@pytest.fixture(scope="module")
def topo():
    with Topology(n_clients=3, gso=False) as t:
        # A second upstream host (10.77.2.3, fd77:2::3): the same servers, not in any garden.
        run_in(t.upstream.ns, "ip", "addr", "add", f"{OTHER4}/24", "dev", t.upstream.ifname)
        # (deprecated, so that answers of the echo server, bound to ::, still come from fd77:2::2)
        run_in(t.upstream.ns, "ip", "addr", "add", f"{OTHER6}/64", "dev", t.upstream.ifname, "nodad",
               "preferred_lft", "0")
        t.http_server(t.upstream.ns, "UPSTREAM", [80, 8080, 8333, 50002])
        t.http_server(t.router.ns, "PORTAL", [PORTAL_PORT])
        t.udp_echo(t.upstream.ns, [53, 7, 8333, 50001])
        t.udp_echo(t.router.ns, [53, CAPTIVE_DNS_PORT])  # the owner's resolver, the captive one
        u = t.upstream
        c1 = t.clients[0]
        t.install_counters(
            u.ns,
            {
                "from_c1": f"ip saddr {c1.ipv4}",
                "from_c1_v6": f"ip6 saddr {c1.ipv6}",
                "sink_c1ip": f"ip saddr {c1.ipv4} udp dport {SINK}",
                "sink_alias": f"ip saddr 10.77.1.60 udp dport {SINK}",
                "dns_any": "meta l4proto { tcp, udp } th dport 53",
            },
        )
        t.install_counters(c1.ns, {"from_up": f"ip saddr {u.ipv4}", "from_up_v6": f"ip6 saddr {u.ipv6}",
                                   "flood": f"udp dport {CLIENT_SINK}"})
        yield t


@pytest.fixture
def config(topo):
    return FirewallConfig(
        lan_interface=topo.LAN,
        router_ipv4=topo.router.ipv4,
        router_ipv6=topo.router.ipv6,
        portal_port=PORTAL_PORT,
    )


@pytest.fixture
def gate(topo, config):
    with gate_in(topo, config) as g:
        yield g


def paid(host, **kw) -> PaidClient:
    return PaidClient(host.mac, ipv4=host.ipv4, ipv6=(host.ipv6,), **kw)


def http(topo, host, url, **kw):
    return topo.call(host.ns, "http_get", url, **kw)


def delivered(topo) -> int:
    """Bytes that crossed the router between client 1 and upstream, as the endpoints saw them."""
    up = topo.read_counters(topo.upstream.ns)
    down = topo.read_counters(topo.clients[0].ns)
    return up["from_c1"] + up["from_c1_v6"] + down["from_up"] + down["from_up_v6"]


def bitmesh_tables(topo) -> list[str]:
    out = run_in(topo.router.ns, "nft", "list", "tables").stdout
    return [line for line in out.splitlines() if "bitmesh" in line]


def test_unpaid_client_is_captured(topo, gate):
    c = topo.clients[0]
    # HTTP to anywhere answers with the portal, over IPv4 and IPv6.
    assert http(topo, c, "http://10.77.2.2/")["body"] == "PORTAL"
    assert http(topo, c, "http://[fd77:2::2]/")["body"] == "PORTAL"
    # Nothing else upstream: another port, IPv6, outside DNS (UDP and TCP).
    assert not http(topo, c, "http://10.77.2.2:8080/", timeout=1)["ok"]
    assert not http(topo, c, "http://[fd77:2::2]:8080/", timeout=1)["ok"]
    assert topo.call(c.ns, "udp_probe", "10.77.2.2", 53)["replies"] == 0
    assert topo.call(c.ns, "udp_probe", "fd77:2::2", 53)["replies"] == 0
    assert not topo.call(c.ns, "tcp_connect", "10.77.2.2", 53)["ok"]
    assert topo.read_counters(topo.upstream.ns)["dns_any"] == 0
    # What is allowed: DNS on the router (dnat to the captive resolver's port: the echo there
    # answers), the portal directly. No walled garden is configured: no Bitcoin port is open.
    assert topo.call(c.ns, "udp_probe", "10.77.1.1", 53)["replies"] == 3
    assert topo.call(c.ns, "udp_probe", "fd77:1::1", 53)["replies"] == 3
    assert http(topo, c, f"http://10.77.1.1:{PORTAL_PORT}/")["body"] == "PORTAL"
    assert not http(topo, c, "http://10.77.2.2:8333/", timeout=1)["ok"]
    # Other services on the router are closed to LAN clients.
    assert topo.call(c.ns, "udp_probe", "10.77.1.1", 7)["replies"] == 0


GARDEN = (("10.77.2.2", 8333), ("fd77:2::2", 8333), ("10.77.2.2", 80), ("fd77:2::2", 80))


def garden_bound(config, seconds: float) -> int:
    """The most one device may get from the garden in `seconds`, in one direction: the full bucket
    (nft's holds the burst plus a second of rate), the rate, and a slack for what was in flight
    when the bucket emptied (unlimited, it would be gigabytes)."""
    rate = config.garden_rate_kbytes * 1024
    return config.garden_burst_kbytes * 1024 + rate + int(seconds * rate) + 64 * 1024


def garden_elements(topo, name: str) -> list:
    out = run_in(topo.router.ns, "nft", "-j", "list", "set", "inet", "bitmesh", name).stdout
    return next(o["set"] for o in json.loads(out)["nftables"] if "set" in o).get("elem", [])


def test_no_bitcoin_ports_to_arbitrary_hosts(topo, gate):
    """Issue 10, item 4: the garden once opened Bitcoin P2P and Electrum ports (8333, 18333,
    18444, 50001, 50002) to any host, TCP and UDP: a free tunnel for anyone running a server
    there. Now only listed host:port pairs are open; with none listed, nothing is."""
    c = topo.clients[0]
    for url in ("http://10.77.2.2:8333/", "http://10.77.2.2:50002/", "http://[fd77:2::2]:8333/"):
        assert not http(topo, c, url, timeout=1)["ok"], url
    for host in ("10.77.2.2", "fd77:2::2"):
        for port in (8333, 50001):
            assert topo.call(c.ns, "udp_probe", host, port)["replies"] == 0, (host, port)


def test_walled_garden_is_host_and_port_not_captured_rate_limited(topo, config, gate):
    """Issue 10, item 4: a garden entry is host:port (TCP and UDP, IPv4 and IPv6); the host's
    other ports stay closed (once every port of a garden host was open), HTTP to a listed
    host:80 reaches the host (once the portal redirect captured it), and the rate is limited."""
    c = topo.clients[0]
    gate.reload(replace(config, garden=GARDEN))
    assert http(topo, c, "http://10.77.2.2:8333/")["body"] == "UPSTREAM"
    assert http(topo, c, "http://[fd77:2::2]:8333/")["body"] == "UPSTREAM"
    assert topo.call(c.ns, "udp_probe", "10.77.2.2", 8333)["replies"] == 3
    assert topo.call(c.ns, "udp_probe", "fd77:2::2", 8333)["replies"] == 3
    # port 80 of a garden host is the host itself, not the portal
    assert http(topo, c, "http://10.77.2.2/")["body"] == "UPSTREAM"
    assert http(topo, c, "http://[fd77:2::2]/")["body"] == "UPSTREAM"
    # nothing else of the garden host
    assert not http(topo, c, "http://10.77.2.2:8080/", timeout=1)["ok"]
    assert not http(topo, c, "http://[fd77:2::2]:8080/", timeout=1)["ok"]
    assert topo.call(c.ns, "udp_probe", "10.77.2.2", 7)["replies"] == 0
    assert topo.call(c.ns, "udp_probe", "fd77:2::2", 7)["replies"] == 0
    # another host: HTTP captured, the garden's port closed
    assert http(topo, c, f"http://{OTHER4}/")["body"] == "PORTAL"
    assert http(topo, c, f"http://[{OTHER6}]/")["body"] == "PORTAL"
    assert not http(topo, c, f"http://{OTHER4}:8333/", timeout=1)["ok"]
    assert topo.call(c.ns, "udp_probe", OTHER6, 8333)["replies"] == 0
    # at the garden's rate: 64 KiB/s after a 256 KiB burst
    got = topo.call(c.ns, "download", "http://10.77.2.2:8333/bytes/100000000", idle=2, seconds=2.0)
    assert not got["complete"] and 64 * 1024 < got["bytes"] <= garden_bound(config, 2.0)
    gate.reload(config)
    assert not http(topo, c, "http://10.77.2.2:8333/", timeout=1)["ok"]


def test_garden_limit_is_per_device_however_many_addresses(topo, config, gate):
    """Issue 10, item 4: the limit was per source address, so 16 extra addresses gave 1.46 MB/s.
    One device downloading through 17 IPv4 and 17 IPv6 addresses at once gets one device's
    rate in all."""
    c = topo.clients[0]
    gate.reload(replace(config, garden=GARDEN))
    v4, v6 = extra_addresses(c, 16)
    try:
        seconds = 3.0
        got = multi_download(c, ["10.77.2.2", "fd77:2::2"], 8333, [c.ipv4, c.ipv6, *v4, *v6], seconds)
    finally:
        drop_addresses(c, v4 + v6)
    total = sum(got.values())
    assert sum(1 for n in got.values() if n) >= 2  # several addresses got through: each one is limited
    assert 64 * 1024 < total <= garden_bound(config, seconds), got
    assert len(garden_elements(topo, "garden_up")) == 1  # one bucket: the device's


def test_forged_ipv6_sources_neither_fill_the_limit_nor_lift_it(topo, config, gate):
    """Issue 10, item 4: the limit's set held 4,096 source addresses and stopped limiting when
    full: datagrams from 5,000 forged IPv6 sources filled it, then the device's own address went
    unlimited. The buckets are per MAC now: the forged sources make one bucket, the limit holds
    (upload: what reached the garden host from the device's own address; download)."""
    c, u = topo.clients[0], topo.upstream
    gate.reload(replace(config, garden=GARDEN))
    router_mac = mac_of(topo.router.ns, topo.LAN)
    forged = [f"fd77:1::f:{i // 65536:x}:{i % 65536:x}" for i in range(5000)]
    forged_udp6(c, router_mac, forged, "fd77:2::2", 80)  # UDP to a garden host:port that does not answer
    topo.reset_counters(u.ns)
    seconds = 3.0
    sent = udp_blast(c.ns, c.ipv6, "fd77:2::2", 80, seconds)
    arrived = topo.read_counters(u.ns)["from_c1_v6"]
    assert sent > 4 * garden_bound(config, seconds)  # unlimited, it would all have arrived
    assert 0 < arrived <= garden_bound(config, seconds)
    time.sleep(1.0)  # a second of rate back after the blast
    got = multi_download(c, ["fd77:2::2"], 8333, [c.ipv6], seconds)[c.ipv6]
    assert 0 < got <= garden_bound(config, seconds)
    assert len(garden_elements(topo, "garden_up")) == 1  # 5,000 sources, one device, one bucket


def test_full_garden_sets_fail_closed(topo, config, gate):
    """Issue 10, item 4: a device or connection that finds the garden's sets full gets no garden
    at all (never an unlimited one)."""
    c1, c2, c3 = topo.clients
    gate.reload(replace(config, garden=GARDEN, garden_devices=2))
    assert topo.call(c1.ns, "udp_probe", "10.77.2.2", 8333)["replies"] == 3
    assert topo.call(c2.ns, "udp_probe", "10.77.2.2", 8333)["replies"] == 3
    assert topo.call(c3.ns, "udp_probe", "10.77.2.2", 8333)["replies"] == 0  # no room for a third device
    assert not http(topo, c3, "http://10.77.2.2:8333/", timeout=1)["ok"]
    assert topo.call(c1.ns, "udp_probe", "10.77.2.2", 8333)["replies"] == 3  # the others keep theirs
    # Connections: four followed at once; a fifth gets nothing until one times out.
    gate.reload(replace(config, garden=GARDEN, garden_flows=4))
    for _ in range(4):
        assert topo.call(c1.ns, "udp_probe", "10.77.2.2", 8333, n=1)["replies"] == 1  # a new socket: a new flow
    assert topo.call(c1.ns, "udp_probe", "10.77.2.2", 8333, n=1)["replies"] == 0
    assert not http(topo, c2, "http://10.77.2.2:8333/", timeout=1)["ok"]
    gate.reload(config)


def test_unsolicited_inbound_is_dropped_before_it_is_billed(topo, gate):
    """Issue 10, item 5: a UDP flood at a paid client's closed port was counted and billed
    (490 kB) before anything dropped it. Towards the LAN only replies to connections the client
    opened pass now; the flood reaches neither the counters nor the client."""
    c, u = topo.clients[0], topo.upstream
    gate.allow(paid(c, quota_bytes=10**9))
    assert topo.call(c.ns, "udp_probe", "10.77.2.2", 7)["replies"] == 3  # its own flows are fine
    before = gate.usage()[c.mac]
    topo.reset_counters(c.ns)
    sent = udp_flood(u.ns, c.ipv4, CLIENT_SINK, 300) + udp_flood(u.ns, c.ipv6, CLIENT_SINK, 300)
    assert sent == 600_000
    after = gate.usage()[c.mac]
    assert after.bytes_down == before.bytes_down and after.bytes_up == before.bytes_up
    # the flood's own packets: a late packet of an earlier test's connection may still arrive
    got = topo.read_counters(c.ns)
    assert got["flood"] == 0, got
    # what the client asked for is still counted
    assert topo.call(c.ns, "udp_probe", "fd77:2::2", 7)["replies"] == 3
    assert gate.usage()[c.mac].bytes_down > after.bytes_down


def test_paid_client_reaches_upstream_and_is_counted(topo, gate):
    c = topo.clients[0]
    gate.allow(paid(c))
    assert http(topo, c, "http://10.77.2.2/")["body"] == "UPSTREAM"  # no more redirect
    assert http(topo, c, "http://10.77.2.2:8080/")["body"] == "UPSTREAM"
    assert http(topo, c, "http://[fd77:2::2]:8080/")["body"] == "UPSTREAM"
    assert topo.call(c.ns, "udp_probe", "10.77.2.2", 53)["replies"] == 3  # outside DNS now fine
    got = topo.call(c.ns, "download", "http://10.77.2.2:8080/bytes/300000")
    assert got == {"bytes": 300000, "complete": True}
    # The kernel's per-client counters equal what the endpoints saw, per direction.
    u = gate.usage()[c.mac]
    up = topo.read_counters(topo.upstream.ns)
    down = topo.read_counters(topo.clients[0].ns)
    assert u.bytes_up == up["from_c1"] + up["from_c1_v6"]
    assert u.bytes_down == down["from_up"] + down["from_up_v6"]
    assert u.bytes_down > 300000 and not u.expired and not u.exhausted
    # Other clients stay captured.
    assert not http(topo, topo.clients[1], "http://10.77.2.2:8080/", timeout=1)["ok"]


def test_binding_to_mac_and_ip(topo, gate):
    c, spoofer = topo.clients[0], topo.clients[2]
    gate.allow(paid(c))
    # Control: the paid client's datagrams arrive at the upstream counter.
    topo.call(c.ns, "udp_probe", "10.77.2.2", SINK, n=5, timeout=0.05)
    assert topo.read_counters(topo.upstream.ns, "packets")["sink_c1ip"] == 5
    topo.reset_counters(topo.upstream.ns)
    # A second device takes the paid IP with its own MAC: nothing of it gets through.
    with topo.impersonating(spoofer, c.ipv4):
        topo.call(spoofer.ns, "udp_probe", "10.77.2.2", SINK, n=5, timeout=0.05)
        assert not topo.call(spoofer.ns, "tcp_connect", "10.77.2.2", 8080)["ok"]
        assert topo.read_counters(topo.upstream.ns, "packets")["sink_c1ip"] == 0
    try:
        # The paid MAC with another IP: nothing either.
        run_in(c.ns, "ip", "addr", "add", "10.77.1.60/24", "dev", c.ifname)
        topo.call(c.ns, "udp_probe", "10.77.2.2", SINK, n=5, timeout=0.05, source="10.77.1.60")
        assert not topo.call(c.ns, "tcp_connect", "10.77.2.2", 8080, source="10.77.1.60")["ok"]
        assert topo.read_counters(topo.upstream.ns, "packets")["sink_alias"] == 0
    finally:
        run_in(c.ns, "ip", "addr", "del", "10.77.1.60/24", "dev", c.ifname, check=False)
        run_in(topo.router.ns, "ip", "neigh", "flush", "dev", topo.LAN)
    # The real client is still fine afterwards.
    assert http(topo, c, "http://10.77.2.2:8080/")["body"] == "UPSTREAM"


def test_byte_quota_cuts_within_one_packet(topo, gate):
    c = topo.clients[0]
    quota = 200_000
    gate.allow(paid(c, quota_bytes=quota))
    got = topo.call(c.ns, "download", "http://10.77.2.2:8080/bytes/2000000")
    assert not got["complete"]
    total = delivered(topo)
    assert quota - MTU_PACKET < total <= quota  # the kernel drops the packet that would cross it
    u = gate.usage()[c.mac]
    assert u.exhausted and u.total == total
    assert not http(topo, c, "http://10.77.2.2:8080/", timeout=1)["ok"]


def test_update_quota_keeps_used_bytes(topo, gate):
    c = topo.clients[0]
    gate.allow(paid(c, quota_bytes=150_000))
    topo.call(c.ns, "download", "http://10.77.2.2:8080/bytes/2000000")
    used = gate.usage()[c.mac].total
    assert 150_000 - MTU_PACKET < used <= 150_000
    gate.update_quota(c.mac, quota_bytes=300_000)  # a payment for 150 kB more
    after = gate.usage()[c.mac]
    assert after.total >= used and not after.exhausted
    topo.call(c.ns, "download", "http://10.77.2.2:8080/bytes/2000000")
    total = delivered(topo)
    # Had the update reset usage, the second download alone would have reached 300 kB.
    assert 300_000 - MTU_PACKET < total <= 300_000
    assert gate.usage()[c.mac].total == total


def test_time_tariff_ends_at_the_paid_second(topo, gate):
    c = topo.clients[0]
    expires = time.time() + 2.5
    gate.allow(paid(c, expires_at=expires))
    r = topo.call(c.ns, "udp_until", "10.77.2.2", 7, expires + 1.5)
    assert r["first_ok"] is not None and r["first_ok"] < expires - 1.5  # it worked while paid
    assert abs(r["last_ok"] - expires) <= 1.0  # and stopped at the paid second
    assert r["first_fail_after"] is not None and abs(r["first_fail_after"] - expires) <= 1.0
    assert gate.usage()[c.mac].expired
    assert not http(topo, c, "http://10.77.2.2:8080/", timeout=1)["ok"]


def test_revoke_cuts_off(topo, gate):
    c = topo.clients[0]
    gate.allow(paid(c))
    assert http(topo, c, "http://10.77.2.2:8080/")["ok"]
    final = gate.revoke(c.mac)
    assert final is not None and final.bytes_down > 0
    assert not http(topo, c, "http://10.77.2.2:8080/", timeout=1)["ok"]
    assert http(topo, c, "http://10.77.2.2/")["body"] == "PORTAL"
    assert gate.usage() == {}


def test_restart_and_reload_keep_paid_clients(topo, config, gate):
    c, other = topo.clients[0], topo.clients[1]
    fakes = [
        PaidClient(f"02:55:00:00:{i // 256:02x}:{i % 256:02x}", ipv4=f"10.77.{100 + i // 200}.{i % 200 + 1}",
                   quota_bytes=10**9)
        for i in range(249)
    ]
    gate.start([*fakes, paid(c, quota_bytes=10**9)])
    assert http(topo, c, "http://10.77.2.2:8080/")["body"] == "UPSTREAM"
    u = gate.usage()[c.mac]
    ledger = [*fakes, paid(c, quota_bytes=10**9, used_up=u.bytes_up, used_down=u.bytes_down)]

    # Service crash and restart: a new process loads the table again over the old one.
    g2 = Gate(config, Nft(topo.nft_argv()))
    g2.start(ledger)
    assert http(topo, c, "http://10.77.2.2:8080/")["body"] == "UPSTREAM"
    assert g2.usage()[c.mac].total > u.total  # carried, then counted on
    assert not http(topo, other, "http://10.77.2.2:8080/", timeout=1)["ok"]

    # Orderly stop and start.
    before = g2.usage()[c.mac]
    g2.stop()
    assert bitmesh_tables(topo) == []
    g3 = Gate(config, Nft(topo.nft_argv()))
    g3.start([*fakes, paid(c, quota_bytes=10**9, used_up=before.bytes_up, used_down=before.bytes_down)])
    assert http(topo, c, "http://10.77.2.2:8080/")["body"] == "UPSTREAM"
    assert g3.usage()[c.mac].total > before.total

    # Reload with a new config: clients and their counts survive, one table, no stale rules.
    before = g3.usage()[c.mac]
    rules_before = run_in(topo.router.ns, "nft", "-a", "list", "table", "inet", "bitmesh").stdout.count("# handle")
    g3.reload(replace(config, garden=(("10.77.2.2", 8333),)))
    assert http(topo, c, "http://10.77.2.2:8080/")["body"] == "UPSTREAM"
    assert g3.usage()[c.mac].total > before.total
    assert len(bitmesh_tables(topo)) == 1
    rules_after = run_in(topo.router.ns, "nft", "-a", "list", "table", "inet", "bitmesh").stdout.count("# handle")
    assert rules_after == rules_before
    assert len(g3.usage()) == 250
    g3.stop()


def test_coexists_with_fw4_and_stop_leaves_nothing(topo, config):
    fw4 = (
        "table inet fw4 {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n"
        "\t\tct state established,related accept\n\t}\n}\n"
    )
    run_in(topo.router.ns, "nft", "-f", "-", input=fw4)
    try:
        before = run_in(topo.router.ns, "nft", "list", "table", "inet", "fw4").stdout
        g = Gate(config, Nft(topo.nft_argv()))
        g.start([paid(topo.clients[0])])
        # Our drop runs before fw4's established accept: a captured client stays captured.
        assert not http(topo, topo.clients[1], "http://10.77.2.2:8080/", timeout=1)["ok"]
        assert http(topo, topo.clients[0], "http://10.77.2.2:8080/")["body"] == "UPSTREAM"
        g.reload()
        g.stop()
        g.stop()  # idempotent
        assert bitmesh_tables(topo) == []
        assert run_in(topo.router.ns, "nft", "list", "table", "inet", "fw4").stdout == before
    finally:
        subprocess.run(topo.nft_argv() + ["delete", "table", "inet", "fw4"], capture_output=True)
