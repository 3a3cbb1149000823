"""The gate with real kernel packets: client, router and upstream network namespaces.

Traffic stays inside namespaces created here (10.77.x.x, fd77::). Byte measurements use nft
counters in the client and upstream namespaces (what was actually delivered), independent of
the router's own bookkeeping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import replace

import pytest

from bitmesh.firewall import FirewallConfig, Gate, Nft, PaidClient
from tests.support.netns import Topology, run_in

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

PORTAL_PORT = 2050
SINK = 9999  # upstream UDP port with no listener: arrivals are counted, never answered
MTU_PACKET = 1500


@pytest.fixture(scope="module")
def topo():
    with Topology(n_clients=3, gso=False) as t:
        t.http_server(t.upstream.ns, "UPSTREAM", [80, 8080, 8333, 50002])
        t.http_server(t.router.ns, "PORTAL", [PORTAL_PORT])
        t.udp_echo(t.upstream.ns, [53, 7])
        t.udp_echo(t.router.ns, [53])
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
        t.install_counters(c1.ns, {"from_up": f"ip saddr {u.ipv4}", "from_up_v6": f"ip6 saddr {u.ipv6}"})
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
    g = Gate(config, Nft(topo.nft_argv()))
    g.start([])
    for ns in (topo.upstream.ns, topo.clients[0].ns):
        topo.reset_counters(ns)
    try:
        yield g
    finally:
        g.stop()
        run_in(topo.router.ns, "ip", "neigh", "flush", "dev", topo.LAN)


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
    # What is allowed: DNS on the router, the portal directly, the walled garden (Bitcoin P2P).
    assert topo.call(c.ns, "udp_probe", "10.77.1.1", 53)["replies"] == 3
    assert topo.call(c.ns, "udp_probe", "fd77:1::1", 53)["replies"] == 3
    assert http(topo, c, f"http://10.77.1.1:{PORTAL_PORT}/")["body"] == "PORTAL"
    assert http(topo, c, "http://10.77.2.2:8333/")["body"] == "UPSTREAM"
    # Other services on the router are closed to LAN clients.
    assert topo.call(c.ns, "udp_probe", "10.77.1.1", 7)["replies"] == 0


def test_walled_garden_ports_and_hosts_are_open_to_unpaid_clients_rate_limited(topo, config, gate):
    c = topo.clients[0]
    # Bitcoin P2P and Electrum ports anywhere, over IPv4 and IPv6, so a wallet can broadcast.
    assert http(topo, c, "http://10.77.2.2:50002/")["body"] == "UPSTREAM"
    assert http(topo, c, "http://[fd77:2::2]:8333/")["body"] == "UPSTREAM"
    # ... at the garden's rate: 64 KiB/s after a 256 KiB burst, per client and direction.
    got = topo.call(c.ns, "download", "http://10.77.2.2:8333/bytes/100000000", idle=2, seconds=2.0)
    assert not got["complete"]
    burst, rate = config.garden_burst_kbytes * 1024, config.garden_rate_kbytes * 1024
    # slack: what TCP had in flight when the bucket emptied (unlimited, 2 s would be gigabytes)
    assert 64 * 1024 < got["bytes"] <= burst + 2 * rate + 128 * 1024
    # Configured hosts: any port, both families; everything else upstream stays closed.
    gate.reload(replace(config, garden_hosts4=("10.77.2.2",), garden_hosts6=("fd77:2::2",)))
    assert http(topo, c, "http://10.77.2.2:8080/")["body"] == "UPSTREAM"
    assert http(topo, c, "http://[fd77:2::2]:8080/")["body"] == "UPSTREAM"
    gate.reload(config)
    assert not http(topo, c, "http://10.77.2.2:8080/", timeout=1)["ok"]


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
    g3.reload(replace(config, garden_ports=(8333,)))
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
