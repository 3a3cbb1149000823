"""Bytes that pass while a channel is being closed are billed (docs/security.md: "Download for
free while its channel closes").

The real `bitmesh serve` (nftables gate on) in a router namespace, a real `bitmesh pay` in a
client namespace, a bcoin regtest node. A paid client downloads as fast as the link goes and
closes its channel mid-download (POST close with its proof, as `bitmesh close` does). The
settlement bills what the kernel counted at the final read; the gate freezes the device (its
quota lowered in place to nothing, one nft batch) BEFORE that read, so nothing the endpoints
receive afterwards goes unbilled: delivered <= bytes billed + one packet in flight at the commit.
Before the fix the device kept full speed from the final read until its revoke (the settlement's
signing, the journal's fdatasync, the listeners): megabytes at veth speed. The owner's kick
(ubus `kick`, the same close) is one of the rounds. A close refused (`storage_full`) gives the
device its access back; a meter pass's stale read never rewrites a closing channel's count.

Gate level (real nft, no service): a frozen device passes nothing and keeps its count, a payment
meanwhile does not lift the freeze, and a thaw (the close failed: the channel stays open) gives
its access back with the bytes it used and its full allowance.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from bitmesh.firewall import FirewallConfig, PaidClient
from bitmesh.tariff import Tariff
from tests.support.netns import Topology, run_in
from tests.support.router import RouterService, gate_in, payers, portal_call, router_services

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

UP = "10.77.2.2"
PORTAL_PORT = 2050
PACKET = 1500  # one MTU packet (gso=False: the router forwards MTU-sized skbs)
# 100 sat/MB, a step of 200 MB (the link does ~35 MB/s): never near its quota, only the close stops it;
# and what it owes pays a settlement's fee (not `uneconomic`).
TARIFF = {"price_sat_per_mb": 100, "price_sat_per_minute": 0, "prepay_step_sat": 20_000, "min_deposit_sat": 20_000}
ROUNDS = 3  # closes per run (the last one the owner's kick): each one a chance for the window to show


@pytest.fixture(scope="module")
def topo():
    with Topology(n_clients=1, gso=False) as t:
        t.http_server(t.upstream.ns, "UPSTREAM", [8080])
        c1 = t.clients[0]
        t.install_counters(t.upstream.ns, {"from_c1": f"ip saddr {c1.ipv4}"})
        t.install_counters(c1.ns, {"from_up": f"ip saddr {t.upstream.ipv4}"})
        yield t


@pytest.fixture(scope="module")
def node(topo, bcoin):
    """The regtest node, reachable from the router namespace (its RPC bridged in, once)."""
    topo.bridge_tcp(topo.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
    return bcoin


def delivered(topo) -> int:
    """Bytes that crossed the router between client 1 and upstream, as the endpoints counted them."""
    return topo.read_counters(topo.upstream.ns)["from_c1"] + topo.read_counters(topo.clients[0].ns)["from_up"]


def _download(topo, out: dict) -> None:
    out.update(topo.call(topo.clients[0].ns, "download", f"http://{UP}:8080/bytes/{10**12}", idle=1.0, seconds=30))


@pytest.mark.regtest
def test_bytes_after_the_final_read_of_a_close_are_billed(topo, node, faucet, tmp_path):
    """Each round: pay, download at full speed, close mid-download. Once the transfer has stalled,
    the endpoints' count is at most the bytes the settlement bills (+ one packet), and the owed
    figure is the tariff of exactly those bytes."""
    gaps = []
    with router_services(topo) as started, payers(topo, faucet, tmp_path, counted=(topo.upstream.ns,
                                                                                  topo.clients[0].ns)) as pay:
        # with ubus: the owner's kick (control.kick, the same close) takes the last round
        service = RouterService(topo, node, tmp_path / "router", TARIFF, with_ubus=True).start()
        started.append(service)
        for i in range(ROUNDS):
            payer = pay(service, 100_000, interval=0.2)
            payer.wait_for(r"^paid \d+ sat", timeout=60)
            got: dict = {}
            t = threading.Thread(target=_download, args=(topo, got), daemon=True)
            t.start()
            time.sleep(1.5)  # full speed by now
            before = delivered(topo)
            if i < ROUNDS - 1:
                closed = payer.close()
            else:
                assert service.ubus_call("kick", mac=topo.clients[0].mac) == {"kicked": [payer.channel_id]}
                closed = portal_call(topo.clients[0].ns, service.url, "channel", payer.channel_id)
            assert closed["state"] == "settling", (before, closed["paid"], closed["owed"], closed["state"])
            t.join(40)
            assert not t.is_alive() and got.get("bytes", 0) > 0, got
            carried = delivered(topo)
            session = payer.session()
            billed = session["bytes_used"]
            assert billed > before > 10_000_000, (before, billed)  # it really was downloading, fast
            assert closed["owed"] == min(closed["paid"], Tariff(100, 0).owed(billed, 0))  # the tariff of those bytes
            gaps.append(carried - billed)
            payer.kill()
        print(f"carried - billed per close (bytes; the last one a kick): {gaps}")
        assert all(g <= PACKET for g in gaps), f"bytes carried but never billed, per close: {gaps}"


@pytest.mark.regtest
def test_a_close_that_fails_gives_the_device_its_access_back(topo, node, faucet, tmp_path):
    """The journal cannot grow (the service's file size limit is set to the journal's size: its
    append fails with EFBIG, `storage_full`, as on a full flash, where a page's slack may or may not
    take one more record): the close is refused, the channel stays open, and the device, frozen for
    the final read, gets its access back at once (the thaw; no payment, no table reload needed).
    With room again the close goes through and bills every byte."""
    with router_services(topo) as started, \
            payers(topo, faucet, tmp_path, counted=(topo.upstream.ns, topo.clients[0].ns)) as pay:
        service = RouterService(topo, node, tmp_path / "router", TARIFF).start()
        started.append(service)
        payer = pay(service, 100_000, interval=0.2)
        payer.wait_for(r"^paid \d+ sat", timeout=60)
        assert _get(topo, 60_000_000)["complete"]  # enough used that a settlement pays its fee
        journal = service.workdir / "state" / "channels.journal"
        assert service.proc is not None
        pid = str(service.proc.pid)  # `ip netns exec` execs the service: its pid
        run_in(topo.router.ns, "prlimit", "--pid", pid, f"--fsize={journal.stat().st_size}:unlimited")
        try:
            refused = payer.close()
        finally:
            run_in(topo.router.ns, "prlimit", "--pid", pid, "--fsize=unlimited:unlimited")
        assert refused.get("error", {}).get("code") == "storage_full", refused
        assert payer.session()["channel_state"] == "open"
        got = _get(topo, 5_000_000)  # the device is not left frozen
        assert got["complete"], got
        closed = payer.close()
        assert closed["state"] == "settling", closed
        assert not _get(topo, 100_000)["complete"]  # closed: cut off
        billed = payer.session()["bytes_used"]
        assert billed >= 65_000_000
        assert delivered(topo) <= billed + PACKET
        assert closed["owed"] == min(closed["paid"], Tariff(100, 0).owed(billed, 0))


@pytest.mark.regtest
def test_a_stale_meter_read_never_changes_a_closing_channels_count(hotspot):
    """A meter pass that read the kernel before a close's final read (it waited for the gate while
    the close froze and read) must not write its older, lower count over the closed record: the
    record would then show fewer bytes than its settlement bills. Counts never go down either."""
    manager = hotspot.manager
    payer = hotspot.funded_payer(60_000)
    payer.pay_exact(30_000)
    cid = payer.channel_id or ""
    manager.note_usage(cid, 5_000_000, 0)
    assert manager.note_usage(cid, 4_000_000, 0).bytes_used == 5_000_000  # an older read: no step back
    closed = manager.close(cid)
    assert closed.owed is not None and closed.bytes_used == 5_000_000
    manager.note_usage(cid, 1_000_000, 0)  # the stale pass lands after the close
    manager.note_usage(cid, 9_000_000, 0)  # nor does anything after the final read count
    assert manager.get(cid).bytes_used == 5_000_000 and manager.get(cid).owed == closed.owed


# --- the gate's freeze, on its own -------------------------------------------------------------


@pytest.fixture
def gate(topo):
    config = FirewallConfig(lan_interface=topo.LAN, router_ipv4=topo.router.ipv4, router_ipv6=topo.router.ipv6,
                            portal_port=PORTAL_PORT)
    with gate_in(topo, config) as g:
        yield g


def _get(topo, n: int) -> dict:
    return topo.call(topo.clients[0].ns, "download", f"http://{UP}:8080/bytes/{n}", idle=1.0)


def test_a_frozen_device_passes_nothing_and_a_thaw_gives_its_access_back(topo, gate):
    c1 = topo.clients[0]
    gate.allow(PaidClient(c1.mac, ipv4=c1.ipv4, quota_bytes=50_000_000))
    assert _get(topo, 1_000_000)["complete"]
    used = gate.usage()[c1.mac].total
    assert used >= 1_000_000
    assert gate.freeze(c1.mac)
    frozen_at = delivered(topo)
    assert not _get(topo, 1_000_000)["complete"]  # nothing passes, either way
    assert delivered(topo) - frozen_at <= PACKET  # (a SYN that reached upstream is not possible: cut at ingress)
    assert gate.usage()[c1.mac].total == used  # nothing counted while frozen, nothing lost
    # A payment meanwhile (the meter's grant) is kept for the thaw, and does not lift the freeze.
    gate.update_quota(c1.mac, quota_bytes=60_000_000)
    assert not _get(topo, 100_000)["complete"]
    assert gate.usage()[c1.mac].total == used
    # The close failed: the channel stays open, its access comes back with all it paid for.
    gate.thaw(c1.mac)
    assert gate.clients()[c1.mac].quota_bytes == 60_000_000
    assert _get(topo, 1_000_000)["complete"]
    after = gate.usage()[c1.mac].total
    assert used + 1_000_000 <= after <= delivered(topo) + PACKET
    # and its quota counts from what it used: 60 MB in all, not 60 MB more
    got = _get(topo, 70_000_000)
    assert not got["complete"] and got["bytes"] < 60_000_000 - after + PACKET * 10, got
    assert gate.usage()[c1.mac].total <= 60_000_000


def test_a_revoke_after_a_freeze_leaves_nothing_behind(topo, gate):
    c1 = topo.clients[0]
    gate.allow(PaidClient(c1.mac, ipv4=c1.ipv4, quota_bytes=50_000_000))
    assert gate.freeze(c1.mac)
    final = gate.revoke(c1.mac)
    assert final is not None and c1.mac not in gate.clients()
    gate.thaw(c1.mac)  # a thaw after the revoke (a listener ran first) grants nothing
    assert c1.mac not in gate.clients()
    assert not _get(topo, 100_000)["complete"]
    out = run_in(topo.router.ns, "nft", "list", "table", "inet", "bitmesh").stdout
    assert c1.mac.lower() not in out.lower()
