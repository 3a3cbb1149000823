"""The chain watch in a hostile world, on the real bcoin regtest node (issue 9, items 1-3).

The router's backend goes through tests/support/faults.py's FaultProxy, which forwards to the
node and, when told, lies (fee estimates of a spike, "not found", "spent elsewhere") or hangs.
"Miners" with a fee floor (faults.mine_above) mine only packages paying enough, so a settlement
paying too little stays in the node's mempool while the chain moves on. Every settlement,
fee bump and payout read back from the chain passes Bitcoin Core's interpreter
(hotspot.confirmed_tx / consensus.verify_on_node).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

import pytest
from bitcoin.core import CTransaction

from bitmesh.chain.core_rpc import CoreRpcBackend
from bitmesh.chain.esplora import EsploraBackend
from bitmesh.chain.retry import Retry
from bitmesh.channel import contract as c
from bitmesh.channel.state import Phase
from bitmesh.errors import ChainError
from bitmesh.portal.client import PortalError
from tests.support.bcoin import BcoinNode
from tests.support.coins import Faucet, key_address, new_key
from tests.support.consensus import verify_on_node
from tests.support.esplora_server import EsploraTestServer
from tests.support.faults import (
    FaultProxy,
    fee_estimate_rule,
    hide_tx_rule,
    mine_above,
    spent_elsewhere_rule,
)
from tests.support.hotspot import Hotspot, confirmed_tx, mine_to

pytestmark = pytest.mark.regtest

FAST = Retry(attempts=2, base_delay=0.01, max_delay=0.02)


class Market:
    """The fee market the proxy reports (None: whatever the node says, i.e. no estimate)."""

    def __init__(self) -> None:
        self.rate: float | None = None


@pytest.fixture
def rig(bcoin: BcoinNode, faucet: Faucet, tmp_path) -> Iterator[tuple[Hotspot, FaultProxy, Market]]:
    with _rig("core", bcoin, faucet, tmp_path) as parts:
        yield parts


@contextlib.contextmanager
def _rig(kind: str, node: BcoinNode, faucet: Faucet, tmp_path, **policy) -> Iterator[tuple[Hotspot, FaultProxy,
                                                                                           Market]]:
    """A router whose chain backend (Core RPC or Esplora) sits behind a FaultProxy."""
    esplora = EsploraTestServer(node).start() if kind == "esplora" else None
    target = ("127.0.0.1", esplora.httpd.server_address[1] if esplora else node.rpc_port)
    proxy = FaultProxy(target)
    market = Market()
    proxy.rules.append(fee_estimate_rule(lambda: market.rate))
    if esplora:
        chain = EsploraBackend(proxy.url().rstrip("/"), timeout=1.0, retry=FAST)
    else:
        chain = CoreRpcBackend(proxy.url(f"x:{node.api_key}"), timeout=1.0, retry=FAST)
    hotspot = Hotspot.start(node, faucet, tmp_path / "state", **{"chain_stale_seconds": 2, **policy})
    hotspot.chain = hotspot.manager.chain = chain
    try:
        yield hotspot, proxy, market
    finally:
        hotspot.stop()
        proxy.close()
        if esplora:
            esplora.stop()


def paid_channel(hotspot: Hotspot, deposit: int, paid: int):
    payer = hotspot.funded_payer(deposit)
    payer.pay_exact(paid)
    return payer


def settle_all_mempool(node: BcoinNode) -> None:
    """Leave no transaction of an earlier test behind for the fee-floor miners to weigh."""
    if node.rpc("getrawmempool"):
        node.mine(1, key_address(new_key()))


def package_rate(node: BcoinNode, txids: list[str]) -> float:
    pool = node.rpc("getrawmempool", True)
    fee = sum(round(float(pool[t]["fee"]) * 1e8) for t in txids)
    size = sum(int(pool[t]["size"]) for t in txids)
    return fee / size


def hold_value(tx: CTransaction, channel) -> int:
    hold = c.hold_script(channel.server_pubkey)
    return sum(o.nValue for o in tx.vout if bytes(o.scriptPubKey) == hold)


# --- item 3: fee spike ---------------------------------------------------------------------


def test_fee_spike_settlement_is_bumped_by_cpfp_and_confirms_before_the_refund_is_valid(rig):
    hotspot, _proxy, market = rig
    node, manager = hotspot.node, hotspot.manager
    settle_all_mempool(node)
    payer = paid_channel(hotspot, 100_000, 30_000)
    hotspot.mine(1)  # the funding confirms (the fee market is calm)
    manager.watch()
    closed = payer.close()  # at the backend's estimate: none on regtest, so the 2 sat/vB fallback
    settlement_txid = closed["settlement_txid"]
    assert node.mempool_has(settlement_txid)
    first_rate = package_rate(node, [settlement_txid])
    assert first_rate < 5

    # The spike: miners take 20 sat/vB and more, the backend says 30. The settlement sits.
    market.rate = 30.0
    mine_above(node, 20.0)
    assert node.mempool_has(settlement_txid)
    channel = manager.get(payer.channel_id)
    assert channel.phase is Phase.SETTLING and not channel.bumps

    manager.watch()  # sees it unconfirmed below the estimate: one CPFP child from the owner's share
    channel = manager.get(payer.channel_id)
    assert len(channel.bumps) == 1
    child_txid = c.txid_of(CTransaction.deserialize(channel.bumps[0]))
    assert node.mempool_has(settlement_txid) and node.mempool_has(child_txid)  # the first version stays
    assert package_rate(node, [settlement_txid, child_txid]) >= 30.0

    mined = mine_above(node, 20.0)
    assert settlement_txid in mined and child_txid in mined
    settlement = confirmed_tx(node, settlement_txid)  # Core's interpreter judges the contract spend
    verify_on_node(node, child_txid)
    height = node.rpc("getrawtransaction", settlement_txid, 1)["confirmations"]
    assert node.height() - height + 1 < payer.channel.contract.expiry  # before the refund is valid
    assert settlement.vout[0].nValue == 70_000  # the client's signed change, untouched
    assert bytes(settlement.vout[0].scriptPubKey) == payer.channel.refund_script

    manager.watch()  # settled: the owner's share moves on to the payout address
    channel = manager.get(payer.channel_id)
    assert channel.phase is Phase.SETTLED and channel.payout_txid
    mine_above(node, 20.0)
    payout = confirmed_tx(node, channel.payout_txid)
    assert bytes(payout.vout[0].scriptPubKey) == hotspot.payout_script
    owner_fees = (30_000 - payout.vout[0].nValue)
    assert 0 < owner_fees < 30_000 // 2  # every fee came out of the owner's share
    manager.watch()
    assert manager.get(payer.channel_id).payout_confirmed


# --- item 3: outage across the margin, stale view ------------------------------------------


def test_outage_across_the_margin_settles_every_paid_channel_when_the_backend_returns(rig):
    hotspot, proxy, market = rig
    node, manager = hotspot.node, hotspot.manager
    settle_all_mempool(node)
    payers = [paid_channel(hotspot, 60_000, 10_000 * (k + 1)) for k in range(3)]
    hotspot.mine(1)
    manager.watch()
    expiry = min(p.channel.contract.expiry for p in payers)

    proxy.stall()  # the backend hangs; the chain moves on into the margin without the router
    mine_to(hotspot, expiry - hotspot.policy.settle_margin_blocks)
    time.sleep(hotspot.policy.chain_stale_seconds + 0.5)
    with pytest.raises(PortalError) as refused:  # the frozen tip is not believed any more
        payers[0].pay_exact(50_000)
    assert refused.value.code == "channel_expiring"
    with pytest.raises(ChainError):
        manager.watch()  # blind: every paid channel is signed and on disk, to broadcast later
    assert [manager.get(p.channel_id).phase for p in payers] == [Phase.SETTLING] * 3

    market.rate = 15.0  # fees rose meanwhile; miners take 10 sat/vB and more
    proxy.release()
    manager.watch()  # broadcast, and bumped at once: the blind fee was the last one known
    mine_above(node, 10.0)
    manager.watch()
    for payer in payers:
        channel = manager.get(payer.channel_id)
        assert channel.phase is Phase.SETTLED, channel
        settlement = confirmed_tx(node, channel.settlement_txid)
        assert settlement.vout[0].nValue == 60_000 - channel.paid
    assert node.height() < expiry  # none reached the refund


def test_stale_chain_view_refuses_payments_until_the_backend_answers(rig):
    hotspot, proxy, _market = rig
    payer = paid_channel(hotspot, 50_000, 1_000)
    hotspot.manager.watch()
    proxy.stall()
    time.sleep(hotspot.policy.chain_stale_seconds + 0.5)
    with pytest.raises(PortalError) as refused:
        payer.pay_exact(2_000)
    assert refused.value.code == "channel_expiring"
    assert hotspot.manager.get(payer.channel_id).paid == 1_000  # nothing changed
    proxy.release()
    hotspot.manager.watch()
    assert payer.pay_exact(2_000)["paid"] == 2_000


# --- item 1: one channel never stops the others ----------------------------------------------


def test_uneconomic_channel_ends_in_its_own_phase_and_the_channels_after_it_settle(
    bcoin: BcoinNode, faucet: Faucet, tmp_path
):
    with _rig("core", bcoin, faucet, tmp_path, min_deposit_sat=2_000) as (hotspot, _proxy, market):
        settle_all_mempool(bcoin)
        small = hotspot.funded_payer(4_000)
        small.pay_exact(4_000)  # fully paid: the owner's 4 000 sat cannot pay ~22 sat/vB fees
        others = [paid_channel(hotspot, 80_000, 20_000) for _ in range(2)]
        hotspot.mine(1)
        market.rate = 22.0
        mine_to(hotspot, small.channel.contract.expiry - hotspot.policy.settle_margin_blocks - 1)
        hotspot.manager.watch()
        channel = hotspot.manager.get(small.channel_id)
        assert channel.phase is Phase.UNECONOMIC and channel.phase.final and not channel.settlement_raw
        for payer in others:
            assert hotspot.manager.get(payer.channel_id).phase is Phase.SETTLING
        hotspot.mine(1)
        hotspot.manager.watch()
        for payer in others:
            confirmed_tx(bcoin, hotspot.manager.get(payer.channel_id).settlement_txid)
        # The client of the uneconomic channel takes its whole deposit back after the expiry.
        mine_to(hotspot, small.channel.contract.expiry)
        refund_txid = hotspot.chain.broadcast(small.channel.refund.serialize())
        hotspot.mine(1)
        assert confirmed_tx(bcoin, refund_txid).vout[0].nValue > 0


def test_an_nft_error_in_one_close_does_not_stop_the_others(rig):
    hotspot, _proxy, _market = rig
    manager = hotspot.manager
    broken = paid_channel(hotspot, 60_000, 30_000)
    others = [paid_channel(hotspot, 60_000, 30_000) for _ in range(2)]
    # The meter read 2 000 MB for the broken one at its last pass; now its kernel read fails.
    manager.note_usage(broken.channel_id, 2_000_000_000, 0)

    def meter(channel):
        if channel.id == broken.channel_id:
            subprocess.run(["nft", "list", "table", "inet", "bitmesh-no-such-table"], check=True, capture_output=True)
        return channel.paid

    manager.owed = meter
    mine_to(hotspot, broken.channel.contract.expiry - hotspot.policy.settle_margin_blocks - 1)
    manager.watch()
    for payer in (broken, *others):
        assert manager.get(payer.channel_id).phase is Phase.SETTLING
    assert manager.get(broken.channel_id).owed == 20_000  # billed as last recorded (10 sat/MB)
    hotspot.mine(1)
    manager.watch()
    for payer in (broken, *others):
        assert manager.get(payer.channel_id).phase is Phase.SETTLED
        confirmed_tx(hotspot.node, manager.get(payer.channel_id).settlement_txid)


# --- item 2: a single "not found" / "spent elsewhere" is not proof ---------------------------


@pytest.mark.parametrize("kind", ["core", "esplora"])
@pytest.mark.parametrize("fault", ["not_found", "spent_elsewhere"])
def test_a_lying_backend_does_not_make_the_channel_final_and_it_settles_when_the_funding_answers(
    kind: str, fault: str, bcoin: BcoinNode, faucet: Faucet, tmp_path
):
    with _rig(kind, bcoin, faucet, tmp_path) as (hotspot, proxy, _market):
        manager = hotspot.manager
        payer = paid_channel(hotspot, 50_000, 5_000)
        hotspot.mine(1)
        manager.watch()
        funding = manager.get(payer.channel_id).funding
        assert funding is not None
        rule = (hide_tx_rule({funding.txid}) if fault == "not_found"
                else spent_elsewhere_rule({(funding.txid, funding.vout)}))
        proxy.rules.insert(0, rule)
        for _ in range(3):  # answers that stay wrong for several passes and blocks
            manager.watch()
            hotspot.mine(1)
        assert manager.get(payer.channel_id).phase is Phase.OPEN
        with pytest.raises(PortalError) as refused:
            payer.pay_exact(6_000)
        assert refused.value.code == "funding_not_found"
        proxy.rules.remove(rule)
        manager.watch()
        assert payer.pay_exact(6_000)["paid"] == 6_000
        mine_to(hotspot, payer.channel.contract.expiry - hotspot.policy.settle_margin_blocks - 1)
        manager.watch()
        channel = manager.get(payer.channel_id)
        assert channel.phase is Phase.SETTLING
        hotspot.mine(1)
        manager.watch()
        assert manager.get(payer.channel_id).phase is Phase.SETTLED
        confirmed_tx(bcoin, channel.settlement_txid)
