"""Fair billing with real packets: the real `bitmesh serve` (nftables gate on, or `--no-firewall`)
in a router namespace, real `bitmesh pay` payers in client namespaces, a bcoin regtest node.

- The billing clock stops while a client has no credit: a client cut off for a while is not
  billed for the gap, and its top-up buys its full worth (issue 9, item 4).
- One live channel per device: a second open from the same MAC, or the funding of a second
  channel, is refused; an open from a caller whose MAC the router cannot see is refused (item 6).
- `--no-firewall`: the offer says nothing is metered, and every answer and the settlement agree
  on owed = paid (item 11).
- What a settlement charges is the `owed` the channel object states, which is the tariff applied
  to what the meter measured (bytes never above what the endpoints saw, seconds never above the
  time the client had access); settlements are read back from the node and judged by Bitcoin
  Core's consensus interpreter (tests/support/router.py read_settlement).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from bitcoin.core import CTransaction

from bitmesh.chain.address import p2wpkh_script, script_to_address
from bitmesh.tariff import Tariff
from tests.support.coins import NETWORK, key_address, new_key
from tests.support.netns import Host, Topology, run_in
from tests.support.router import (
    REPO,
    Payer,
    RouterService,
    expected_split,
    funding_key,
    payers,
    portal_call,
    python_in,
    read_settlement,
    router_services,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

UP = "10.77.2.2"
ECHO = 7
# A combined tariff (like the shipped one: per MB and per minute), with seconds dear enough that
# a prepay step lasts a few seconds: 1000 sat a second, 1 sat a kB; a step buys 5 s.
GAP_TARIFF = {"price_sat_per_mb": 1_000, "price_sat_per_minute": 60_000, "prepay_step_sat": 5_000,
              "min_deposit_sat": 5_000}
SECOND_SAT = 1_000

# Answered UDP echoes, sent every 50 ms until a unix time: the client's own view of its access.
ACCESS_PROBE = r"""
import json, socket, sys, time
host, port, until = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.1)
ok, i = [], 0
while time.time() < until:
    t = time.time()
    msg = b"w%d" % i
    i += 1
    s.sendto(msg, (host, port))
    try:
        while s.recvfrom(2048)[0] != msg:
            pass
        ok.append(t)
    except OSError:
        pass
    time.sleep(max(0.0, 0.05 - (time.time() - t)))
print(json.dumps(ok))
"""

# One device opening two channels, then funding both (the code `bitmesh pay` runs, step by step);
# it waits for a line on stdin between the two halves so the test can look at the node.
TWO_CHANNELS = r"""
import json, sys
from pathlib import Path
from bitmesh.chain.address import p2wpkh_script
from bitmesh.paycli import parse_coin, parse_key
from bitmesh.paying import PayerSession
from bitmesh.portal.client import PortalClient, PortalError

url, refund_address, coins = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
portal = PortalClient(url, timeout=20)
tip = lambda: int(portal.offer()["tip_height"])

def fund(session, key_hex, coin):
    key = parse_key(key_hex)
    try:
        return session.fund_from_coins([parse_coin(coin, key)], p2wpkh_script(key.pub))
    except PortalError as e:
        return {"error": e.code, "message": e.message}

def say(obj):
    print(json.dumps(obj), flush=True)

x, y = PayerSession(portal, tip, refund_address), PayerSession(portal, tip, refund_address)
x.open(10_000)
y.open(12_000)  # an unfunded channel does not block another open
funded_x = fund(x, *coins[0])
refused_y = fund(y, *coins[1])  # x is live: refused before anything is broadcast
say({"x": x.channel_id, "y": y.channel_id, "x_state": funded_x.get("state"), "y_refused": refused_y,
     "y_funding": str(y.channel.funding.txid), "y_channel": portal.channel(y.channel_id)})
sys.stdin.readline()
paid = x.pay_exact(1_000)
closed = x.close()
funded_y = fund(y, *coins[1])  # x is settling: y may go live now
say({"x_paid": paid, "x_closed": closed["state"], "y_state": funded_y.get("state"), "y_answer": funded_y})
"""


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=3, gso=False) as t:
        t.bridge_tcp(t.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        t.http_server(t.upstream.ns, "UPSTREAM", [8080])
        t.udp_echo(t.upstream.ns, [ECHO])
        c1 = t.clients[0]
        t.install_counters(t.upstream.ns, {"from_c1": f"ip saddr {c1.ipv4}"})
        t.install_counters(c1.ns, {"from_up": f"ip saddr {t.upstream.ipv4}"})
        yield t


class NoFirewallRouter(RouterService):
    """`bitmesh serve --no-firewall` (development mode: nobody gated, nothing metered)."""

    def start(self, timeout: float = 20.0) -> NoFirewallRouter:
        # a gated router stopped for a "restart" leaves its table loaded (fail-closed): not ours
        run_in(self.topo.router.ns, "nft", "delete", "table", "inet", "bitmesh", check=False)
        argv = ["ip", "netns", "exec", self.topo.router.ns, sys.executable, "-m", "bitmesh.cli", "serve",
                "--config", str(self.config), "--watch-interval", "1", "--no-ubus", "--no-firewall"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                portal_call(self.topo.router.ns, self.url, "offer")
                return self
            except RuntimeError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"service did not come up:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.1)


@pytest.fixture
def router(topo, bcoin, tmp_path):
    """`router(**uci_options)` starts the service (`firewall=False`: with --no-firewall)."""
    with router_services(topo) as started:
        def start(firewall: bool = True, **options) -> RouterService:
            kind = RouterService if firewall else NoFirewallRouter
            service = kind(topo, bcoin, tmp_path / f"router{len(started)}", options).start()
            started.append(service)
            return service

        yield start


@pytest.fixture
def pay(topo, faucet, tmp_path):
    with payers(topo, faucet, tmp_path, counted=(topo.upstream.ns, topo.clients[0].ns)) as start:
        yield start


def delivered(topo) -> int:
    """Bytes that crossed the router between client 1 and upstream, as the endpoints counted them."""
    return topo.read_counters(topo.upstream.ns)["from_c1"] + topo.read_counters(topo.clients[0].ns)["from_up"]


def access_windows(topo, client, until: float) -> list[tuple[float, float]]:
    """(first, last) answered probe of each stretch of access the client had until `until`."""
    ok = json.loads(python_in(client.ns, ACCESS_PROBE, UP, str(ECHO), str(until), timeout=until - time.time() + 30)
                    .stdout)
    windows: list[list[float]] = []
    for t in ok:
        if windows and t - windows[-1][1] < 0.5:
            windows[-1][1] = t
        else:
            windows.append([t, t])
    return [(a, b) for a, b in windows]


def payment_times(payer: Payer) -> list[tuple[float, int]]:
    return [(t, int(line.split()[1])) for t, line in payer.lines if line.startswith("paid ")]


def settlement(bcoin, txid: str, channel: dict, refund_address: str, service: RouterService):
    """The settlement read back from the node (read_settlement: Core's interpreter judges it), the
    owner's share told apart wherever it goes: the payout address, or the router's hold output
    (P2WPKH of the channel's server key, moved on to the payout address once settled: 3.4)."""
    raw = bytes.fromhex(bcoin.rpc("getrawtransaction", txid, 0))
    scripts = {bytes(o.scriptPubKey) for o in CTransaction.deserialize(raw).vout}
    hold = p2wpkh_script(bytes.fromhex(channel["server_pubkey"]))
    owner = script_to_address(hold, NETWORK) if hold in scripts else service.payout_address
    return read_settlement(bcoin, txid, channel["deposit"], refund_address, owner)


def failed_with(payer: Payer, code: str) -> str:
    """`bitmesh pay` gave up at once, naming `code` (it never paid)."""
    try:
        rc = payer.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the payer was not refused; output: {payer.output()}") from None
    err = payer.stderr.read_text()
    assert rc == 2 and f"bitmesh: {code}:" in err, payer.output()
    assert not payer.payments()
    return err


def test_a_client_cut_off_is_not_billed_for_the_gap_and_its_top_up_buys_its_full_worth(topo, router, pay, bcoin):
    """`bitmesh pay` checking in every 9 s: it pays a step (5 s of access), is cut off when the
    credit is gone, pays again 9 s after the first payment, and closes. The gap is not billed: the
    top-up gives as much access again, and the bill is the access the client had."""
    c = topo.clients[0]
    service = router(**GAP_TARIFF)
    payer = pay(service, 30_000, duration=10, interval=9)
    payer.wait_for(r"^paid \d+ sat")
    start = time.time()
    windows = access_windows(topo, c, until=start + 15.5)
    (t1, first), (t2, second) = payment_times(payer)
    assert t2 - t1 > 8.5
    # Two stretches of access: one per payment, as long as each other, with the gap between.
    assert len(windows) == 2, windows
    (a1, b1), (a2, b2) = windows
    # Each lasts the step's 5 s, less up to the whole second that the bytes' fraction of a satoshi
    # takes from the time (seconds are billed whole), and less the meter's pass for the first.
    assert a1 < t1 + 1 and 2.8 <= b1 - t1 <= 5.1, windows
    assert abs(a2 - t2) < 1 and 2.8 <= b2 - t2 <= 5.1, windows
    assert abs((b2 - a2) - (b1 - a1)) < 1.5 and a2 - b1 > 2.5, windows
    session = payer.session()  # the channel's, proven by its key
    assert session["state"] == "exhausted" and session["paid"] == second
    # Billed: the time the client had access, not the wall clock since its first payment.
    # (Whole seconds from the second of each payment; a meter pass may cut up to a second late.)
    had_access = (b1 - t1) + (b2 - a2)
    assert had_access - 2.5 <= session["seconds_used"] <= had_access + 2
    assert session["seconds_used"] < (b2 - t1) - 0.5  # the gap (a2 - b1 > 2.5 s) is not billed
    assert 0 < session["bytes_used"] <= delivered(topo)
    assert session["owed"] == Tariff(1_000, 60_000).owed(session["bytes_used"], session["seconds_used"])
    assert 0 <= session["credit"] < SECOND_SAT  # the top-up went to access, less than a second is left

    txid = payer.wait_for(r"^closed: state settling, settlement ([0-9a-f]{64})", timeout=15).group(1)
    channel = portal_call(c.ns, service.url, "channel", payer.channel_id)
    assert channel["state"] == "settling" and channel["settlement_txid"] == txid
    assert channel["owed"] == session["owed"]  # nothing used since, nothing billed since
    bcoin.mine(1, key_address(new_key()))
    s = settlement(bcoin, txid, channel, payer.refund_address, service)
    assert (s.change, s.payout, s.unused) == expected_split(30_000, second, channel["owed"], s.fee)


def test_a_close_after_a_gap_returns_the_unused_top_up(topo, router, pay, bcoin):
    """Cut off, top up, close a second later: the settlement charges the first step's access plus
    that second, and the rest of the top-up goes back to the client (the gap is not billed)."""
    c = topo.clients[0]
    service = router(**GAP_TARIFF)
    payer = pay(service, 30_000, duration=60, interval=9)
    payer.wait_for(r"^paid \d+ sat")
    mark = len(payer.lines)
    payer.wait_for(r"^paid \d+ sat", after=mark, timeout=20)
    windows = access_windows(topo, c, until=time.time() + 1.0)
    assert windows, "the top-up after the gap gave no access"
    payer.kill()
    (t1, _), (t2, paid) = payment_times(payer)
    closed = payer.close()
    closed_at = time.time()
    assert closed["state"] == "settling"
    session = payer.session()
    # The first step's seconds (at most 5) and those since the top-up: the 4 s gap is not among them.
    assert session["seconds_used"] <= 5 + (closed_at - t2) + 1 < closed_at - t1 - 2
    owed = session["owed"]
    assert owed == Tariff(1_000, 60_000).owed(session["bytes_used"], session["seconds_used"])
    assert paid - owed >= 2 * SECOND_SAT
    assert closed["owed"] == owed  # the figure the close committed to
    bcoin.mine(1, key_address(new_key()))
    s = settlement(bcoin, closed["settlement_txid"], closed, payer.refund_address, service)
    assert s.confirmations == 1 and s.unused == paid - owed  # the unused top-up, back to the client
    assert (s.change, s.payout, s.unused) == expected_split(30_000, paid, owed, s.fee)


def test_one_live_channel_per_device(topo, router, pay, faucet, bcoin):
    """A second `bitmesh pay` from a device with a live channel is refused and the first keeps its
    access and its count; a device may hold unfunded channels, but funding one while another is
    live is refused before anything is broadcast; once the first is closed the other may go live."""
    c = topo.clients[0]
    service = router()
    first = pay(service, 30_000)
    first.wait_for(r"^paid \d+ sat")
    second = pay(service, 20_000)
    err = failed_with(second, "client_has_channel")
    assert "close it first" in err
    assert topo.call(c.ns, "http_get", f"http://{UP}:8080/")["body"] == "UPSTREAM"
    session = first.session()
    assert session["state"] == "open" and session["channel_id"] == first.channel_id
    captive = json.loads(topo.call(c.ns, "http_get", f"{service.url}/api/captive")["body"])
    assert captive["captive"] is False and 0 < captive["bytes-remaining"]  # the kernel meter's figure
    first.kill()
    # closed: settling, or `uneconomic` when the little it used does not pay a settlement fee
    assert first.close()["state"] in ("settling", "uneconomic")

    coins = [funding_key(faucet, 13_000), funding_key(faucet, 15_000)]
    proc = subprocess.Popen(["ip", "netns", "exec", c.ns, sys.executable, "-c", TWO_CHANNELS, service.url,
                             key_address(new_key()), json.dumps(coins)],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        half = json.loads(proc.stdout.readline() or json.dumps({"failed": proc.stderr.read()}))
        assert half.get("x_state") == "open", half
        assert half["y_refused"]["error"] == "client_has_channel", half
        assert half["y_channel"]["state"] == "awaiting_funding" and half["y_channel"]["owed"] == 0
        assert not bcoin.mempool_has(half["y_funding"])  # refused before the router broadcast it
        proc.stdin.write("go\n")
        proc.stdin.flush()
        rest = json.loads(proc.stdout.readline() or json.dumps({"failed": proc.stderr.read()}))
    finally:
        proc.kill()
        proc.wait()
    assert rest.get("x_closed") in ("settling", "uneconomic") and rest["y_state"] == "open", rest
    assert bcoin.mempool_has(half["y_funding"])
    assert portal_call(c.ns, service.url, "channel", half["y"])["state"] == "open"
    # the device's public state is y's (funded, nothing paid yet), no longer the settled x's
    assert portal_call(c.ns, service.url, "session")["state"] == "unpaid"


@contextlib.contextmanager
def host_behind(topo: Topology, gateway: Host) -> Iterator[Host]:
    """A host on a subnet of its own (10.77.9.0/24) behind `gateway`, a LAN client that routes for
    it: a device behind a second router. The router reaches it through the gateway's LAN address,
    so its neighbour table never holds the host's address (the gateway's ARP uses its own)."""
    host = Host(f"{topo.prefix}-b", "eth0", "10.77.9.2", "fd77:9::2")
    subprocess.run(["ip", "netns", "add", host.ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", "behind", "netns", gateway.ns, "type", "veth", "peer", "name",
                        host.ifname, "netns", host.ns], check=True)
        run_in(gateway.ns, "ip", "addr", "add", "10.77.9.1/24", "dev", "behind")
        run_in(gateway.ns, "ip", "link", "set", "behind", "up")
        run_in(gateway.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run_in(host.ns, "ip", "link", "set", "lo", "up")
        run_in(host.ns, "ip", "addr", "add", f"{host.ipv4}/24", "dev", host.ifname)
        run_in(host.ns, "ip", "link", "set", host.ifname, "up")
        run_in(host.ns, "ip", "route", "add", "default", "via", "10.77.9.1")
        run_in(topo.router.ns, "ip", "route", "add", "10.77.9.0/24", "via", gateway.ipv4)
        yield host
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "delete", host.ns], capture_output=True)
        run_in(topo.router.ns, "ip", "route", "del", "10.77.9.0/24", check=False)
        run_in(gateway.ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")


def test_an_open_from_a_device_the_router_cannot_see_is_refused(topo, router, faucet, tmp_path):
    """A device behind another router (client 3 routes for it) reaches the portal, but the router has
    no MAC for its address, so it could never grant it access: its open is refused at once (before,
    it was billed in full and never got access). Client 3 itself, on the LAN segment, is served."""
    gateway = topo.clients[2]
    service = router()
    with host_behind(topo, gateway) as host:
        assert topo.call(host.ns, "http_get", f"{service.url}/")["ok"]  # the portal answers it
        payer = Payer(topo, host, service, faucet, 20_000, tmp_path / "behind")
        try:
            failed_with(payer, "client_mac_unknown")
            assert portal_call(host.ns, service.url, "session")["state"] == "unpaid"
        finally:
            payer.kill()
        neigh = run_in(topo.router.ns, "ip", "neigh", "show", host.ipv4).stdout
        assert "lladdr" not in neigh, neigh  # the router never saw a MAC for the caller
    payer = Payer(topo, gateway, service, faucet, 20_000, tmp_path / "gateway")
    try:
        payer.wait_for(r"^paid \d+ sat")
    finally:
        payer.kill()


def test_no_firewall_offer_api_and_settlement_agree_on_owed_equal_paid(topo, router, pay, bcoin):
    """`bitmesh serve --no-firewall`: the offer says nothing is metered; the session, the channel
    object and the close all state owed = paid, and the settlement charges exactly that."""
    c = topo.clients[0]
    service = router(firewall=False, prepay_step_sat=5_000, min_deposit_sat=5_000)
    offer = portal_call(c.ns, service.url, "offer")
    assert offer["metered"] is False
    assert offer["fee_policy"] == {"paid_from": "owner_share", "client_max_sat": 545}
    payer = pay(service, 30_000, interval=1)
    payer.wait_for(r"^paid \d+ sat")
    assert topo.call(c.ns, "http_get", f"http://{UP}:8080/")["body"] == "UPSTREAM"  # nobody is gated
    payer.kill()
    session = payer.session()
    channel = portal_call(c.ns, service.url, "channel", payer.channel_id)
    paid = channel["paid"]
    assert paid > 0 and session["owed"] == channel["owed"] == paid and session["credit"] == 0
    closed = payer.close()
    assert (closed["state"], closed["owed"]) == ("settling", paid)
    bcoin.mine(1, key_address(new_key()))
    s = settlement(bcoin, closed["settlement_txid"], closed, payer.refund_address, service)
    assert s.confirmations == 1 and s.change == 30_000 - paid and s.unused == 0 and s.payout + s.fee == paid
