"""`make demo`: the whole hotspot, for real, in three network namespaces (run as root).

    client --- [router: bitmesh serve, nftables] --- upstream (web server)
                       |
                 bcoin regtest (this machine's loopback, bridged into the router namespace)

A client is captured, opens a payment channel with `bitmesh pay`, downloads while paying,
stops paying and is cut off by the kernel at the byte its payments covered, then closes the
channel; the settlement is mined and read back from the node. Exits 0 only if every step of
the story happened with the expected figures; namespaces and processes are always removed.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.bcoin import BcoinNode
from tests.support.coins import Faucet, key_address, new_key
from tests.support.netns import Topology
from tests.support.router import (
    Payer,
    RouterService,
    expected_split,
    portal_call,
    read_settlement,
    regtest,
    wait_payout,
)

PRICE_SAT_PER_MB = 1000
PREPAY_STEP_SAT = 500
DEPOSIT_SAT = 30_000
BROWSE_BYTES = 4_000_000  # downloaded while paying, paced at BROWSE_RATE
BROWSE_RATE = 2_000_000
MTU = 1500


class StoryFailed(AssertionError):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise StoryFailed(what)


def _mb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e6:.2f} MB)"


def run_story(topo: Topology, node: BcoinNode, faucet: Faucet, workdir: Path,
              say: Callable[[str], None] = print) -> dict:
    """The demo on a topology (one client at least, GSO off) and a node at READY_HEIGHT.
    Returns the figures; raises StoryFailed if something did not happen."""
    client, up = topo.clients[0], topo.upstream
    topo.bridge_tcp(topo.router.ns, node.rpc_port, ("127.0.0.1", node.rpc_port))
    topo.http_server(up.ns, "hello from upstream", [80, 8080])
    service = RouterService(topo, node, workdir / "router", {
        "price_sat_per_mb": PRICE_SAT_PER_MB, "prepay_step_sat": PREPAY_STEP_SAT,
    }).start()
    payer: Payer | None = None
    try:
        say(f"router: `bitmesh serve` in {topo.router.ns}, portal {service.url}/, "
            f"tariff {PRICE_SAT_PER_MB} sat/MB, prepay step {PREPAY_STEP_SAT} sat, payout {service.payout_address}")

        say("\n1. A new client joins and is captured")
        splash = topo.call(client.ns, "http_get", f"{service.url}/")
        seen = topo.call(client.ns, "http_get", f"http://{up.ipv4}/")
        check(seen.get("ok") and seen["body"] == splash.get("body"), f"HTTP not redirected to the portal: {seen}")
        say(f"   GET http://{up.ipv4}/ -> redirected to the portal's splash page")
        other = topo.call(client.ns, "http_get", f"http://{up.ipv4}:8080/", timeout=1)
        check(not other["ok"], "an unpaid client reached upstream port 8080")
        say(f"   GET http://{up.ipv4}:8080/ -> no answer (dropped by table inet bitmesh)")

        topo.install_counters(up.ns, {"from_client": f"ip saddr {client.ipv4}"})
        topo.install_counters(client.ns, {"from_upstream": f"ip saddr {up.ipv4}"})

        say(f"\n2. It opens a channel with `bitmesh pay --deposit {DEPOSIT_SAT}` and pays as it goes")
        payer = Payer(topo, client, service, faucet, DEPOSIT_SAT, workdir / "payer")
        funding = payer.wait_for(r"^funding (\w+:\d+) \((\w+)\)")
        say(f"   channel {payer.channel_id}, funding {funding.group(1)} ({funding.group(2)}, 0-conf)")
        first = payer.wait_for(r"^paid (\d+) sat")
        say(f"   first payment: {first.group(1)} sat")
        got = topo.call(client.ns, "http_get", f"http://{up.ipv4}:8080/")
        check(got.get("body") == "hello from upstream", f"paid client does not reach upstream: {got}")
        say(f"   GET http://{up.ipv4}:8080/ -> {got['body']!r}")
        started = time.monotonic()
        got = topo.call(client.ns, "download", f"http://{up.ipv4}:8080/bytes/{BROWSE_BYTES}",
                        idle=5, rate=BROWSE_RATE)
        check(got["complete"], f"download while paying did not complete: {got}")
        say(f"   downloaded {_mb(got['bytes'])} in {time.monotonic() - started:.1f} s while paying:")
        for _, line in payer.lines:
            if line.startswith("paid "):
                say(f"     {line}")
        check(len(payer.payments()) >= 3, "the payer did not keep paying")

        say("\n3. It stops paying (the payer is killed) and keeps downloading")
        payer.kill()
        channel = portal_call(client.ns, service.url, "channel", payer.channel_id)
        paid = int(channel["paid"])
        quota = paid * 1_000_000 // PRICE_SAT_PER_MB
        got = topo.call(client.ns, "download", f"http://{up.ipv4}:8080/bytes/{10 * quota}", idle=1.5)
        check(not got["complete"], "the client was never cut off")
        up_c = topo.read_counters(up.ns)["from_client"]
        down_c = topo.read_counters(client.ns)["from_upstream"]
        delivered = up_c + down_c
        say(f"   paid {paid} sat = quota {_mb(quota)}")
        say(f"   cut off after {_mb(delivered)} crossed the router (upload {up_c:,} + download {down_c:,}): "
            f"{quota - delivered} bytes short of the quota (one packet is {MTU})")
        check(quota - MTU < delivered <= quota, "the cut-off is not within one packet of the paid quota")
        session = payer.session()  # the channel's, proven by its key
        say(f"   the router's meter: {session['bytes_used']:,} bytes used, owes {session['owed']} sat, "
            f"state {session['state']}")
        check(session["bytes_used"] == delivered, "the router's count differs from what was delivered")

        say("\n4. It closes the channel; the router settles, a block is mined")
        closed = payer.close()  # with its key's proof
        check(closed.get("state") == "settling" and closed.get("settlement_txid"), f"close failed: {closed}")
        node.mine(1, key_address(new_key()))
        owed = min(paid, math.ceil(delivered * PRICE_SAT_PER_MB / 1_000_000))
        s = read_settlement(node, closed["settlement_txid"], DEPOSIT_SAT, payer.refund_address,
                            service.payout_address)
        check(s.confirmations >= 1, "the settlement is not mined")
        say(f"   settlement {s.txid} ({s.confirmations} confirmation)")
        say(f"     deposit          {DEPOSIT_SAT:>7} sat")
        say(f"     client change    {s.change:>7} sat  (deposit - paid {paid})")
        say(f"     owner's share    {s.payout:>7} sat  (owed {owed} - fee; on the router's hold output)")
        say(f"     unused, returned {s.unused:>7} sat  (paid - owed, dropped into the fee when below 546)")
        say(f"     fee              {s.fee:>7} sat")
        check((s.change, s.payout, s.unused) == expected_split(DEPOSIT_SAT, paid, owed, s.fee)
              and 0 < s.fee < 1000, f"settlement amounts are not exact: {s}")
        payout_txid, received = wait_payout(node, s.txid, service.payout_address)
        say(f"   payout {payout_txid}: {received} sat to the owner's address (share - {s.payout - received} fee)")
        check(0 < s.payout - received < 1000, "the owner's share did not reach the payout address")
        say("\nEverything happened as it should.")
        return {"deposit": DEPOSIT_SAT, "paid": paid, "owed": owed, "quota": quota, "delivered": delivered,
                "payments": payer.payments(), "funding": funding.group(1), "settlement": s,
                "refund_address": payer.refund_address, "payout_address": service.payout_address}
    finally:
        if payer is not None:
            payer.kill()
        service.stop()


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bitmesh-demo-") as tmp:
        try:
            with regtest(Path(tmp) / "bcoin") as (node, faucet), Topology(n_clients=1, gso=False) as topo:
                print(f"bcoin regtest at height {node.height()}, faucet holds {faucet.balance:,} sat")
                print(f"namespaces: client {topo.clients[0].ns} ({topo.clients[0].ipv4}), router {topo.router.ns} "
                      f"({topo.router.ipv4}), upstream {topo.upstream.ns} ({topo.upstream.ipv4})")
                run_story(topo, node, faucet, Path(tmp))
        except AssertionError as e:  # StoryFailed, or a step that never came
            print(f"\nDEMO FAILED: {e}", file=sys.stderr)
            return 1
    print(f"demo done in {time.monotonic() - started:.0f} s; namespaces and processes removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
