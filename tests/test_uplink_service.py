"""Uplink mode's buyer (bitmesh/uplink/service.py) against a real upstream portal and the real
bcoin node: it funds an uplink channel from the owner's wallet, keeps the upstream credit a step
ahead as the upstream meter runs, never signs past the budget (a restart included), stops selling
and cuts when the budget is spent, and the upstream channel settles on-chain for what was paid,
the rest back to the wallet.

The upstream here is tests/support/hotspot.py's in-process router without a gate: it meters
nothing, so its `owed` is the time since the first payment at its per-minute price, by the
payer's clock (bitmesh.channel.payer.unmetered_owed); the test moves that clock. The two-hop
layout with both routers' real gates is tests/test_resale_netns.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitmesh.chain.base import ChainBackend
from bitmesh.channel.state import Phase
from bitmesh.channel.storage import Disk
from bitmesh.errors import StorageFull
from bitmesh.tariff import Tariff
from bitmesh.uplink import buyer
from bitmesh.uplink.buyer import UplinkPolicy
from bitmesh.uplink.service import Uplink, default_gateway
from bitmesh.uplink.wallet import UplinkWallet
from tests.support.bcoin import BcoinNode
from tests.support.coins import NETWORK, Faucet
from tests.support.hotspot import Hotspot, confirmed_tx

pytestmark = pytest.mark.regtest

SAT_PER_MINUTE = 600  # 10 sat a second
STEP = 1_000
BUDGET = 5_000


@pytest.fixture
def upstream(bcoin: BcoinNode, faucet: Faucet, tmp_path: Path):
    rig = Hotspot.start(bcoin, faucet, tmp_path / "upstream", sat_per_mb=0, sat_per_minute=SAT_PER_MINUTE,
                        prepay_step_sat=STEP)
    yield rig
    rig.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _uplink(upstream: Hotspot, wallet: UplinkWallet, state: Path, clock: Clock, budget: int = BUDGET) -> Uplink:
    policy = UplinkPolicy(budget_sat=budget, deposit_sat=30_000, margin_percent=20, unreachable_seconds=90)
    return Uplink(policy, wallet, upstream.url, state, upstream.chain, clock=clock)


def _wallet(seed: bytes, chain: ChainBackend) -> UplinkWallet:
    return UplinkWallet(seed, chain, NETWORK)


def test_the_buyer_keeps_ahead_within_budget_then_cuts_and_settles(upstream: Hotspot, faucet: Faucet,
                                                                    tmp_path: Path):
    seed = bytes(range(32))
    wallet = _wallet(seed, upstream.chain)
    faucet.pay(wallet.script, 100_000)
    state = tmp_path / "reseller"
    state.mkdir()
    clock = Clock()
    uplink = _uplink(upstream, wallet, state, clock)

    v = uplink.tick()  # opens, funds from the wallet, prepays one step
    assert (v.selling, v.cut) == (True, False)
    ch = uplink.book.channel
    assert ch is not None and ch.deposit == 20_000  # the budget, raised to the upstream's minimum
    router_side = upstream.manager.get(ch.channel_id)
    assert router_side.phase is Phase.OPEN and router_side.paid == STEP
    assert uplink.resale_tariff() == Tariff(0, 720)  # 600 x 1.2
    status = uplink.status()
    assert status["deposit_address"] == wallet.address and status["upstream_price"]["sat_per_minute"] == 600

    clock.now += 30  # 300 sat used: 700 of credit, more than half a step: nothing to pay
    uplink.tick()
    assert upstream.manager.get(ch.channel_id).paid == STEP
    clock.now += 30  # 600 used: 400 left < half a step: topped up to owed + one step
    uplink.tick()
    assert upstream.manager.get(ch.channel_id).paid == 600 + STEP
    assert uplink.verdict.selling

    paid_seen = []
    for _ in range(100):
        clock.now += 10
        v = uplink.tick()
        paid = upstream.manager.get(ch.channel_id).paid
        paid_seen.append(paid)
        assert paid <= BUDGET and uplink.book.committed <= BUDGET
        if v.cut:
            break
    assert v.cut and not v.selling and v.reason == buyer.BUDGET_SPENT
    assert max(paid_seen) <= BUDGET
    # the budget spent, the uplink channel is closed at once: its cost is final, on disk
    final_paid = upstream.manager.get(ch.channel_id).paid
    assert uplink.book.channel is None and uplink.book.spent_closed == final_paid == paid_seen[-1]
    assert upstream.manager.get(ch.channel_id).phase is Phase.SETTLING
    # a restart reads the book: the budget stays spent, nothing more is bought
    again = _uplink(upstream, wallet, state, clock)
    assert again.book.committed == final_paid
    clock.now += 10
    v = again.tick()
    assert v.cut and v.reason == buyer.BUDGET_SPENT and again.book.channel is None

    settled = upstream.manager.get(ch.channel_id)
    upstream.mine(1)
    tx = confirmed_tx(upstream.node, settled.settlement_txid)
    back = sum(o.nValue for o in tx.vout if bytes(o.scriptPubKey) == wallet.script)
    assert back == ch.deposit - settled.paid  # an unmetered upstream keeps all that was paid
    # (listing it needs bcoin's address index, which misses confirmed coins here: tests/test_uplink_wallet.py)
    vout = next(i for i, o in enumerate(tx.vout) if bytes(o.scriptPubKey) == wallet.script)
    assert not upstream.chain.get_outspend(settled.settlement_txid, vout).spent


def test_a_payment_is_in_the_book_before_it_leaves(upstream: Hotspot, faucet: Faucet, tmp_path: Path):
    """Each top-up's amount is on disk (the budget counts it) before the upstream has it; a write
    that fails sends nothing."""
    wallet = _wallet(bytes(range(1, 33)), upstream.chain)
    faucet.pay(wallet.script, 100_000)
    clock = Clock()
    uplink = _uplink(upstream, wallet, tmp_path, clock, budget=20_000)
    writes: list[tuple[int, int]] = []  # (signed_max in the book written, what the upstream holds then)
    failing = [False]

    class Watched(Disk):
        def write_file(self, path: Path, chunks):
            chunks = list(chunks)
            book = json.loads(b"".join(chunks))
            if failing[0]:
                raise StorageFull("no room")
            if book["channel"]:
                writes.append((book["channel"]["signed_max"], upstream.manager.get(book["channel"]["channel_id"]).paid
                               if book["channel"]["signed_max"] else 0))
            return super().write_file(path, chunks)

    uplink.store.disk = Watched()
    uplink.tick()
    clock.now += 55  # 550 used: a top-up to 1 550 is due
    uplink.tick()
    ch = uplink.book.channel
    assert ch is not None and upstream.manager.get(ch.channel_id).paid == 1_550
    assert (STEP, 0) in writes and (1_550, STEP) in writes  # each written while the upstream held less
    failing[0] = True
    clock.now += 60  # 1 150 used: the next top-up is due
    uplink.tick()
    assert uplink.error == "storage_full" and upstream.manager.get(ch.channel_id).paid == 1_550  # not sent
    failing[0] = False
    restarted = _uplink(upstream, wallet, tmp_path, clock, budget=20_000)
    assert restarted.book.committed == 1_550  # the failed write's amount was never on disk, nor sent
    # it resumes the channel from the book, the seed and the refund on disk, and pays on
    restarted.store.disk = Disk()
    clock.now += 10
    assert restarted.tick().selling and restarted.error is None
    paid = upstream.manager.get(ch.channel_id).paid
    assert paid > 1_550 and restarted.book.committed == paid and restarted.book.channel.channel_id == ch.channel_id


def test_a_silent_upstream_stops_the_selling(upstream: Hotspot, faucet: Faucet, tmp_path: Path):
    wallet = _wallet(bytes(range(3, 35)), upstream.chain)
    faucet.pay(wallet.script, 100_000)
    clock = Clock()
    uplink = _uplink(upstream, wallet, tmp_path, clock, budget=20_000)
    assert uplink.tick().selling
    upstream.http.stop()  # the upstream portal goes away
    clock.now += 30
    v = uplink.tick()
    assert uplink.error is not None and v.selling  # a moment's failure: not yet a cut
    clock.now += 61  # silent for longer than unreachable_seconds
    v = uplink.tick()
    assert (v.selling, v.reason) == (False, buyer.UPSTREAM_UNREACHABLE)


def test_an_empty_wallet_sells_nothing(upstream: Hotspot, tmp_path: Path):
    wallet = _wallet(bytes(range(2, 34)), upstream.chain)
    uplink = _uplink(upstream, wallet, tmp_path, Clock())
    v = uplink.tick()
    assert (v.selling, v.cut, v.reason) == (False, True, buyer.WALLET_EMPTY)
    assert uplink.book.channel is None and uplink.status()["reason"] == buyer.WALLET_EMPTY


def test_the_service_loads_nothing_of_uplink_mode_while_it_is_off():
    """The router's resident memory: bitmesh.uplink is imported only when uplink_enabled is set."""
    code = ("import sys, bitmesh.service, bitmesh.control, bitmesh.cli; "
            "print([m for m in sys.modules if m.startswith('bitmesh.uplink')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "[]"


def test_the_default_gateway_is_read_from_the_kernels_table(tmp_path: Path):
    table = tmp_path / "route"
    table.write_text("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
                     "wan\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
                     "wan\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\n")
    assert default_gateway(table) == "192.168.2.1"
    assert default_gateway(tmp_path / "missing") is None
