"""Fault scenarios against a real bcoin regtest node: what the owner and the clients lose.

Each scenario runs a router's channel side (tests/support/hotspot.py) whose chain backend sits
behind tests/support/faults.py's FaultProxy, drives it through a fault, lets the chain (and
"miners" with a fee floor, faults.mine_above) run until every channel is final and every payout
confirmed, and then reads what each party really got back from the node (every transaction
through Bitcoin Core's interpreter, tests/support/consensus.py).

faults.lost_sat
    Summed over every channel of every scenario: owner_lost + client_lost, where
      owner_lost  = (owed - fees the router chose: settlement, its CPFP bumps, the payout)
                    - what reached the owner's payout address, confirmed
      client_lost = (deposit - paid + unused credit returned by the fee policy: paid - owed when
                    at least 546 sat, else 0) - what reached the client's refund script, confirmed
    For a channel that ends `uneconomic` the terms are: the owner gets nothing, the client its
    deposit back less the fee of the refund it signed itself. Must be 0.
faults.<scenario>.lost_sat
    The same per scenario: fee_spike (a settlement at 2 sat/vB while miners take >= 20),
    outage (the backend hangs across the margin, 3 channels, fees rise meanwhile), uneconomic
    (a 4 000 sat channel at 22 sat/vB before two normal ones, plus a meter that fails with an
    nft error), lying_backend ("not found" and "spent elsewhere" answers for several blocks).
faults.<scenario>.bumps
    CPFP children the router broadcast in that scenario.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bitcoin.core import CTransaction

from bitmesh.chain.core_rpc import CoreRpcBackend
from bitmesh.chain.retry import Retry
from bitmesh.channel import contract as c
from bitmesh.channel.state import Channel, Phase
from bitmesh.errors import ChainError
from tests.support.bcoin import BcoinNode
from tests.support.coins import Faucet
from tests.support.consensus import verify_on_node
from tests.support.faults import FaultProxy, fee_estimate_rule, hide_tx_rule, mine_above, spent_elsewhere_rule
from tests.support.hotspot import Hotspot, mine_to
from tests.support.router import regtest

FAST = Retry(attempts=2, base_delay=0.01, max_delay=0.02)
FLOOR_SAT_VB = 10.0  # what "miners" take in a calm market for these scenarios


class Rig:
    def __init__(self, node: BcoinNode, faucet: Faucet, workdir: Path, **policy):
        self.node = node
        self.proxy = FaultProxy(("127.0.0.1", node.rpc_port))
        self.rate: float | None = None
        self.proxy.rules.append(fee_estimate_rule(lambda: self.rate))
        self.hotspot = Hotspot.start(node, faucet, workdir, **{"chain_stale_seconds": 2, **policy})
        chain = CoreRpcBackend(self.proxy.url(f"x:{node.api_key}"), timeout=1.0, retry=FAST)
        self.hotspot.chain = self.hotspot.manager.chain = chain
        self.channels: list[tuple[str, int]] = []  # (channel id, deposit)
        self.refunds: dict[str, bytes] = {}

    def paid(self, deposit: int, paid: int) -> str:
        payer = self.hotspot.funded_payer(deposit)
        payer.pay_exact(paid)
        self.channels.append((payer.channel_id or "", deposit))
        self.refunds[payer.channel_id or ""] = payer.channel.refund.serialize()
        return payer.channel_id or ""

    def watch(self) -> None:
        try:
            self.hotspot.manager.watch()
        except ChainError:
            pass

    def run_out(self, floor: float) -> None:
        """Blocks at `floor` until every channel is final and paid out, then past the expiry,
        where every client tries its refund (it must only work for an uneconomic channel)."""
        manager = self.hotspot.manager
        for _ in range(60):
            self.watch()
            live = [manager.get(i) for i, _ in self.channels]
            if all(ch.phase.final and (ch.payout_confirmed or ch.phase is not Phase.SETTLED) for ch in live):
                break
            mine_above(self.node, floor)
        expiry = max(manager.get(i).expiry for i, _ in self.channels)
        mine_to(self.hotspot, expiry)
        for channel_id, _ in self.channels:
            try:
                self.hotspot.chain.broadcast(self.refunds[channel_id])
            except ChainError:
                pass  # refused: the funding was settled
        self.node.mine(1, _burn())
        self.watch()

    def lost(self) -> tuple[int, int]:
        """(lost_sat, bumps) over this rig's channels."""
        lost = bumps = 0
        for channel_id, deposit in self.channels:
            channel = self.hotspot.manager.get(channel_id)
            lost += _lost(self.node, channel, deposit, self.refunds[channel_id], self.hotspot.payout_script)
            bumps += len(channel.bumps)
        return lost, bumps

    def stop(self) -> None:
        self.hotspot.stop()
        self.proxy.close()


def _burn() -> str:
    from tests.support.coins import key_address, new_key

    return key_address(new_key())


def _confirmed(node: BcoinNode, txid: str | None) -> CTransaction | None:
    if not txid:
        return None
    try:
        info = node.rpc("getrawtransaction", txid, 1)
    except Exception:
        return None
    return verify_on_node(node, txid) if info.get("confirmations", 0) >= 1 else None


def _lost(node: BcoinNode, ch: Channel, deposit: int, refund_raw: bytes, payout_script: bytes) -> int:
    refund = CTransaction.deserialize(refund_raw)
    refund_tx = _confirmed(node, c.txid_of(refund))
    client_got = sum(o.nValue for o in refund_tx.vout) if refund_tx else 0
    if ch.phase is Phase.UNECONOMIC:
        return max(0, (deposit - (deposit - sum(o.nValue for o in refund.vout))) - client_got)
    owed = ch.owed if ch.owed is not None else ch.paid
    settlement = _confirmed(node, ch.settlement_txid)
    unused = ch.paid - owed if ch.paid - owed >= c.DUST_LIMIT_SAT else 0
    client_expected = deposit - ch.paid + unused
    owner_got, fees = 0, owed  # nothing settled: the whole share is lost
    if settlement is not None:
        client_got += sum(o.nValue for o in settlement.vout if bytes(o.scriptPubKey) == ch.refund_script)
        fees = deposit - sum(o.nValue for o in settlement.vout)
        fees -= ch.paid - owed - unused  # a dropped dust credit is the client's, not the owner's fee
        hold = sum(o.nValue for o in settlement.vout if bytes(o.scriptPubKey) == c.hold_script(ch.server_pubkey))
        for raw in (*ch.bumps, ch.payout_raw):
            if raw:
                child = CTransaction.deserialize(raw)
                fees += hold - child.vout[0].nValue
                hold = child.vout[0].nValue
        payout = _confirmed(node, ch.payout_txid)
        owner_got = sum(o.nValue for o in payout.vout if bytes(o.scriptPubKey) == payout_script) if payout else 0
    return max(0, owed - fees - owner_got) + max(0, client_expected - client_got)


def _fee_spike(rig: Rig) -> None:
    rig.paid(100_000, 30_000)
    rig.hotspot.mine(1)
    rig.watch()
    rig.hotspot.manager.close(rig.channels[0][0])  # no estimate on regtest: 2 sat/vB
    rig.rate = 30.0
    rig.run_out(20.0)


def _outage(rig: Rig) -> None:
    for k in range(3):
        rig.paid(60_000, 10_000 * (k + 1))
    rig.hotspot.mine(1)
    rig.watch()
    expiry = min(rig.hotspot.manager.get(i).expiry for i, _ in rig.channels)
    rig.proxy.stall()
    mine_to(rig.hotspot, expiry - rig.hotspot.policy.settle_margin_blocks)
    time.sleep(rig.hotspot.policy.chain_stale_seconds + 0.3)
    rig.watch()  # blind settlement
    rig.rate = 15.0
    rig.proxy.release()
    rig.run_out(FLOOR_SAT_VB)


def _uneconomic(rig: Rig) -> None:
    small = rig.paid(4_000, 4_000)
    broken = rig.paid(60_000, 30_000)
    rig.paid(80_000, 20_000)
    rig.paid(80_000, 20_000)
    manager = rig.hotspot.manager
    manager.note_usage(broken, 2_000_000_000, 0)
    metered: Callable[[Channel], int] = manager.owed

    def meter(channel: Channel) -> int:
        if channel.id == broken:
            subprocess.run(["nft", "list", "table", "inet", "bitmesh-no-such-table"], check=True, capture_output=True)
        return metered(channel)

    manager.owed = meter
    rig.hotspot.mine(1)
    rig.rate = 22.0
    mine_to(rig.hotspot, manager.get(small).expiry - rig.hotspot.policy.settle_margin_blocks - 1)
    rig.run_out(FLOOR_SAT_VB)


def _lying_backend(rig: Rig) -> None:
    first = rig.paid(50_000, 5_000)
    second = rig.paid(50_000, 5_000)
    rig.hotspot.mine(1)
    rig.watch()
    a, b = (rig.hotspot.manager.get(i).funding for i in (first, second))
    rules = [hide_tx_rule({a.txid}), spent_elsewhere_rule({(b.txid, b.vout)})]
    rig.proxy.rules[:0] = rules
    for _ in range(3):
        rig.watch()
        rig.hotspot.mine(1)
    for rule in rules:
        rig.proxy.rules.remove(rule)
    rig.watch()
    mine_to(rig.hotspot, rig.hotspot.manager.get(first).expiry - rig.hotspot.policy.settle_margin_blocks - 1)
    rig.run_out(FLOOR_SAT_VB)


SCENARIOS = {"fee_spike": (_fee_spike, {}), "outage": (_outage, {}),
             "uneconomic": (_uneconomic, {"min_deposit_sat": 2_000}), "lying_backend": (_lying_backend, {})}


def run() -> dict[str, object]:
    results: dict[str, object] = {}
    total = 0
    with tempfile.TemporaryDirectory(prefix="bitmesh-faults-") as tmp, regtest(Path(tmp) / "node") as (node, faucet):
        for name, (scenario, policy) in SCENARIOS.items():
            if node.rpc("getrawmempool"):
                node.mine(1, _burn())
            rig = Rig(node, faucet, Path(tmp) / name, **policy)
            try:
                scenario(rig)
                lost, bumps = rig.lost()
            finally:
                rig.stop()
            results[f"faults.{name}.lost_sat"] = lost
            results[f"faults.{name}.bumps"] = bumps
            total += lost
    results["faults.lost_sat"] = total
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
