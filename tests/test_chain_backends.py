"""One contract for every chain backend, run against a real bcoin regtest node: Core JSON-RPC
straight to bcoin, Esplora REST through the thin test server in front of the same node."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator

import pytest

from bitmesh.chain import make_backend
from bitmesh.chain.address import p2wpkh_script
from bitmesh.chain.base import FALLBACK_FEERATE_SAT_VB, MAX_FEERATE_SAT_VB, MIN_FEERATE_SAT_VB, ChainBackend
from bitmesh.chain.esplora import EsploraBackend, pick_estimate
from bitmesh.chain.retry import Retry
from bitmesh.errors import BroadcastRejected, ChainError, ChainUnavailable, ConfigError
from tests.support.bcoin import BcoinNode
from tests.support.coins import (
    Coin,
    Faucet,
    key_address,
    mine_coinbase_to_key,
    new_key,
    sign_p2pkh_spend,
    sign_p2wpkh_spend,
    txid_of,
)
from tests.support.esplora_server import EsploraTestServer

Connect = Callable[..., ChainBackend]


@pytest.fixture(params=["core", "esplora"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """connect(node, retry=None) -> a backend of this run's kind reading `node`."""
    servers: list[EsploraTestServer] = []

    def _connect(node: BcoinNode, retry: Retry | None = None) -> ChainBackend:
        if request.param == "core":
            return make_backend("core", node.rpc_url, retry=retry)
        server = EsploraTestServer(node).start()
        servers.append(server)
        return make_backend("esplora", server.url, retry=retry)

    yield _connect
    for server in servers:
        server.stop()


def _no_retry_expected(delay: float) -> None:
    raise AssertionError("a backend retried against a healthy node: some failure is being masked")


@pytest.fixture
def chain(connect: Connect, bcoin: BcoinNode) -> ChainBackend:
    return connect(bcoin, retry=Retry(sleep=_no_retry_expected))


def _funded_coin(bcoin: BcoinNode, faucet: Faucet, value: int = 100_000, confirm: bool = True):
    key = new_key()
    coin, _ = faucet.pay(p2wpkh_script(key.pub), value)
    if confirm:
        bcoin.mine(1, key_address(new_key()))
    return key, coin


def _spend(key, coin: Coin, fee: int = 1_000):
    """A valid spend of `coin` with two outputs (bcoin refuses a lone output eating the coin as fee)."""
    half = (coin.value - fee) // 2
    return sign_p2wpkh_spend(key, [coin], [(p2wpkh_script(new_key().pub), half),
                                            (coin.script, coin.value - fee - half)])  # fmt: skip


def _random_txid() -> str:
    return secrets.token_hex(32)


# --- contract ----------------------------------------------------------------------------


@pytest.mark.regtest
def test_tip_height_and_median_time_match_the_node(chain: ChainBackend, bcoin: BcoinNode):
    before = chain.tip_height()
    assert before == bcoin.height()
    bcoin.mine(1, key_address(new_key()))
    assert chain.tip_height() == before + 1
    assert chain.median_time_past() == bcoin.rpc("getblockchaininfo")["mediantime"]


@pytest.mark.regtest
def test_esplora_median_time_from_timestamps_when_blocks_lack_mediantime(bcoin: BcoinNode):
    # older electrs give no mediantime: the backend takes the median of 11 timestamps itself
    with EsploraTestServer(bcoin, with_mediantime=False) as server:
        assert EsploraBackend(server.url).median_time_past() == bcoin.rpc("getblockchaininfo")["mediantime"]


@pytest.mark.regtest
def test_get_tx_unknown_mempool_and_confirmed(chain: ChainBackend, bcoin: BcoinNode, faucet: Faucet):
    assert chain.get_tx(_random_txid()) is None

    coin, tx = faucet.pay(p2wpkh_script(new_key().pub), 50_000)
    status = chain.get_tx(coin.txid)
    assert status is not None
    assert (status.txid, status.raw, status.confirmations, status.block_height) == (
        coin.txid, tx.serialize(), 0, None,
    )  # fmt: skip

    bcoin.mine(1, key_address(new_key()))
    mined_at = bcoin.height()
    status = chain.get_tx(coin.txid)
    assert (status.confirmations, status.block_height) == (1, mined_at)

    bcoin.mine(2, key_address(new_key()))
    assert chain.get_tx(coin.txid).confirmations == 3


@pytest.mark.regtest
def test_outspend_unspent_then_spent(chain: ChainBackend, bcoin: BcoinNode, faucet: Faucet):
    key, coin = _funded_coin(bcoin, faucet)
    assert chain.get_outspend(coin.txid, coin.vout).spent is False
    assert chain.get_outspend(coin.txid, 7).spent is False  # no such output
    assert chain.get_outspend(_random_txid(), 0).spent is False  # no such tx

    spend = _spend(key, coin)
    spend_txid = chain.broadcast(spend.serialize())
    bcoin.mine(1, key_address(new_key()))

    out = chain.get_outspend(coin.txid, coin.vout)
    assert out.spent is True
    if isinstance(chain, EsploraBackend):
        assert (out.spending_txid, out.confirmations) == (spend_txid, 1)
    else:  # Core RPC has no outpoint -> spender index for confirmed spends
        assert out.spending_txid is None
    # the change output of the spend is unspent
    assert chain.get_outspend(spend_txid, 1).spent is False


@pytest.mark.regtest
def test_outspend_sees_a_spend_still_in_the_mempool(chain: ChainBackend, bcoin: BcoinNode, faucet: Faucet):
    # the funding double-spent case: a confirmed coin, spent by a tx not mined yet (bcoin's
    # gettxout misses this; the Core backend asks bcoin's REST /coin instead)
    key, coin = _funded_coin(bcoin, faucet)
    spend_txid = chain.broadcast(_spend(key, coin).serialize())
    out = chain.get_outspend(coin.txid, coin.vout)
    assert (out.spent, out.confirmations) == (True, 0)
    if isinstance(chain, EsploraBackend):
        assert out.spending_txid == spend_txid
    else:  # gettxspendingprevout names it on Bitcoin Core >= 24; bcoin lacks the call
        assert out.spending_txid is None


@pytest.mark.regtest
def test_broadcast_valid_tx_lands_in_the_mempool(chain: ChainBackend, bcoin: BcoinNode, faucet: Faucet):
    key, coin = _funded_coin(bcoin, faucet)
    spend = _spend(key, coin)
    raw = spend.serialize()
    assert chain.broadcast(raw) == txid_of(spend)
    assert bcoin.mempool_has(txid_of(spend))
    # sending it again (a restart resending a pending settlement) is a success, before and
    # after it is mined
    assert chain.broadcast(raw) == txid_of(spend)
    bcoin.mine(1, key_address(new_key()))
    assert chain.broadcast(raw) == txid_of(spend)
    assert chain.get_tx(txid_of(spend)).confirmations == 1


def _missing_input(key, coin):
    return _spend(key, Coin(_random_txid(), 0, coin.value, coin.script))


def _bad_signature(key, coin):
    return _spend(new_key(), coin)  # signed by a key that does not own the coin


def _double_spend(key, coin):
    return _spend(key, coin, fee=3_000)  # conflicts with the spend already in the mempool


@pytest.mark.regtest
@pytest.mark.parametrize("make_bad", [_missing_input, _bad_signature, _double_spend])
def test_broadcast_of_invalid_tx_is_rejected(chain: ChainBackend, bcoin: BcoinNode, faucet: Faucet, make_bad):
    key, coin = _funded_coin(bcoin, faucet)
    assert chain.broadcast(_spend(key, coin).serialize())  # the tx a double spend conflicts with
    bad = make_bad(key, coin)
    with pytest.raises(BroadcastRejected) as err:
        chain.broadcast(bad.serialize())
    assert err.value.code == "broadcast_rejected"
    assert txid_of(bad) in str(err.value)
    assert not bcoin.mempool_has(txid_of(bad))


@pytest.mark.regtest
def test_broadcast_of_garbage_is_rejected(chain: ChainBackend):
    with pytest.raises(BroadcastRejected):
        chain.broadcast(b"\x02\x00\x00\x00garbage")


@pytest.mark.regtest
def test_fee_estimate_falls_back_on_regtest(chain: ChainBackend, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING):
        rate = chain.estimate_feerate(6)
    assert caplog.records == []  # "no estimate" was answered, not an error swallowed
    assert MIN_FEERATE_SAT_VB <= rate <= MAX_FEERATE_SAT_VB
    assert rate == FALLBACK_FEERATE_SAT_VB  # regtest has no fee history


@pytest.mark.regtest
@pytest.mark.parametrize("kind", ["p2pkh", "p2wpkh"])
def test_coin_helpers_make_spendable_coinbases(chain: ChainBackend, bcoin: BcoinNode, kind: str):
    key = new_key()
    coins = mine_coinbase_to_key(bcoin, key, blocks=2, kind=kind)
    assert len(coins) == 2 and all(c.value > 0 for c in coins)
    sign = sign_p2pkh_spend if kind == "p2pkh" else sign_p2wpkh_spend
    total = sum(c.value for c in coins)
    tx = sign(key, coins, [(p2wpkh_script(new_key().pub), total // 2), (coins[0].script, total // 2 - 2_000)])
    assert chain.broadcast(tx.serialize()) == txid_of(tx)
    assert bcoin.mempool_has(txid_of(tx))


# --- outages -----------------------------------------------------------------------------


class Sleeps:
    """Injectable sleep: records the delays and runs `on_sleep` instead of waiting."""

    def __init__(self, on_sleep: Callable[[], None] = lambda: None):
        self.delays: list[float] = []
        self.on_sleep = on_sleep

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.on_sleep()


@pytest.mark.regtest
def test_outage_retries_with_growing_delays_then_chain_unavailable(
    connect: Connect, bcoin_factory, caplog: pytest.LogCaptureFixture
):
    node = bcoin_factory(height=3)
    sleeps = Sleeps()
    chain = connect(node, retry=Retry(attempts=4, base_delay=0.5, max_delay=30, sleep=sleeps))
    assert chain.tip_height() == 3
    node.stop()

    with caplog.at_level(logging.WARNING), pytest.raises(ChainUnavailable) as err:
        chain.tip_height()
    assert err.value.code == "chain_unavailable"
    assert sleeps.delays == [0.5, 1.0, 2.0]
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 3
    assert node.api_key not in caplog.text and node.api_key not in str(err.value)

    # a fee estimate during an outage is the fallback, not an error
    assert chain.estimate_feerate() == FALLBACK_FEERATE_SAT_VB


@pytest.mark.regtest
def test_node_restarted_midway_is_reached_again(connect: Connect, bcoin_factory):
    node = bcoin_factory(height=5)
    sleeps = Sleeps(on_sleep=lambda: node.running or node.start())  # back during the first wait
    chain = connect(node, retry=Retry(attempts=5, base_delay=0.25, sleep=sleeps))
    assert chain.tip_height() == 5
    node.stop()

    assert chain.tip_height() == 5  # same datadir: the chain survived the restart
    assert sleeps.delays == [0.25]
    node.mine(1, key_address(new_key()))
    assert chain.tip_height() == 6


# --- no node -----------------------------------------------------------------------------


def test_make_backend_refuses_unknown_kind_and_bad_urls():
    with pytest.raises(ConfigError, match="unknown chain backend 'electrum'"):
        make_backend("electrum", "http://127.0.0.1:1/")
    with pytest.raises(ConfigError):
        make_backend("esplora", "ftp://example.org/")
    with pytest.raises(ConfigError) as err:
        make_backend("core", "unix:///tmp/x")
    assert err.value.code == "config_invalid"
    with pytest.raises(ConfigError, match="core"):
        make_backend("core", "http://127.0.0.1:1/", colour="red")


@pytest.mark.parametrize(
    ("estimates", "target", "expected"),
    [
        ({}, 6, None),
        ({"2": 30.0, "6": 12.5, "144": 1.0}, 6, 12.5),
        ({"2": 30.0, "6": 12.5, "144": 1.0}, 10, 12.5),  # never a slower target than asked
        ({"2": 30.0, "6": 12.5, "144": 1.0}, 1, 30.0),  # nothing that fast: the fastest there is
        ({"1008": 1.5, "144": 2.0}, 200, 2.0),
    ],
)
def test_pick_estimate(estimates, target, expected):
    assert pick_estimate(estimates, target) == expected


def test_btc_amounts_become_exact_satoshis_without_the_decimal_module():
    """Core's JSON amounts (floats with up to 8 decimals) to satoshis exactly, over the whole
    range, with python3-light's modules only (no decimal); anything else is refused."""
    import random

    from bitmesh.chain.core_rpc import btc_to_sat

    rng = random.Random(7)
    for sat in [0, 1, 1000, 12_345_678, 2_099_999_999_999_999, 2_100_000_000_000_000,
                *(rng.randrange(2_100_000_000_000_001) for _ in range(20_000))]:
        amount = float(f"{sat // 100_000_000}.{sat % 100_000_000:08d}")
        assert btc_to_sat(amount) == sat and btc_to_sat(f"{amount:.8f}") == sat
    assert btc_to_sat(1) == 100_000_000 and btc_to_sat(1e-05) == 1000
    for bad in ("0.123456789", "1e-3x", "", "abc", "1.2.3"):
        with pytest.raises(ChainError):
            btc_to_sat(bad)
