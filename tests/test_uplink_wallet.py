"""The uplink's owner-funded wallet on the real bcoin regtest node: its deposit address, the
coins the chain backend lists for it (mempool and confirmed), and an uplink channel funded from
it through the payer code, every transaction judged by the node and by Core's interpreter.

The backends: bcoin through CoreRpcBackend (its REST /coin/address, bcoin runs with
--index-address), and EsploraBackend against tests/support/esplora_server.py with the one path
it lacks (/address/:addr/utxo) answered here from the same node. Bitcoin Core's `scantxoutset`
path has no server here (no bitcoind on these machines): not run.

bcoin's address index answers mempool coins only on this install: every range read of its
database comes back empty (bdb 0.2.3 was written for leveldown 4; the install pins 5.6.0), so a
confirmed coin is missing from /coin/address and /tx/address alike. The confirmed half of the
bcoin path is therefore an expected failure (strict: it turns red the day the node is fixed);
the test Esplora finds confirmed outputs the way electrs does, from the blocks.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitcoin.core import CTransaction

from bitmesh.chain import make_backend
from bitmesh.chain.address import p2wpkh_script
from bitmesh.chain.base import ChainBackend
from bitmesh.channel.keys import PURPOSE, ChannelKeychain
from bitmesh.errors import ChannelError
from bitmesh.paying import PayerSession
from bitmesh.uplink.wallet import UplinkWallet, derive_secret
from tests.support.bcoin import BcoinNode
from tests.support.coins import NETWORK, Faucet, key_address, new_key
from tests.support.consensus import verify_on_node, verify_spends
from tests.support.esplora_server import EsploraTestServer
from tests.support.hotspot import Hotspot


class EsploraWithUtxo(EsploraTestServer):
    """The test Esplora plus GET /address/:addr/utxo, shaped as Esplora's API.md gives it."""

    SCAN_BLOCKS = 30

    def __init__(self, node: BcoinNode):
        super().__init__(node)
        self._routes.append(("GET", re.compile(r"/address/([0-9a-zA-Z]+)/utxo"), self._utxo))

    def _rest(self, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.node.rpc_port}/{path}")
        req.add_header("Authorization", "Basic " + base64.b64encode(f"x:{self.node.api_key}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def _utxo(self, address: str) -> list[dict]:
        """Mempool coins from bcoin's index (that part works); confirmed ones from the last
        SCAN_BLOCKS blocks, each checked unspent (mempool spends too) through REST /coin."""
        found = {(c["hash"], c["index"]): c for c in self._rest(f"coin/address/{address}") or []}
        tip = self.node.height()
        for height in range(max(0, tip - self.SCAN_BLOCKS), tip + 1):
            block = self.node.rpc("getblock", self.node.rpc("getblockhash", height), True, True)
            for tx in block["tx"]:
                for out in tx["vout"]:
                    if address in (out["scriptPubKey"].get("addresses") or []):
                        coin = self._rest(f"coin/{tx['txid']}/{out['n']}")
                        if coin is not None:
                            found[(tx["txid"], out["n"])] = coin
        return [{"txid": txid, "vout": vout, "value": coin["value"],
                 "status": {"confirmed": False} if coin["height"] < 0 else
                 {"confirmed": True, "block_height": coin["height"]}} for (txid, vout), coin in found.items()]


BCOIN_INDEX_BROKEN = pytest.mark.xfail(strict=True, reason="bcoin's address index misses confirmed coins on this "
                                       "install (bdb range reads empty under leveldown 5.6.0)")


@pytest.fixture(params=["core", "esplora"])
def chain(request: pytest.FixtureRequest, bcoin: BcoinNode) -> Iterator[ChainBackend]:
    if request.param == "core":
        yield make_backend("core", bcoin.rpc_url)
        return
    server = EsploraWithUtxo(bcoin).start()
    try:
        yield make_backend("esplora", server.url)
    finally:
        server.stop()


def _wallet(chain: ChainBackend) -> UplinkWallet:
    return UplinkWallet(secrets.token_bytes(32), chain, NETWORK)


def test_the_deposit_key_is_on_a_branch_no_channel_key_uses():
    seed = secrets.token_bytes(32)
    keychain = ChannelKeychain(seed)
    # derive_secret is the keychain's own BIP32: the same path gives the same key
    assert all(bytes(keychain.key(i).pub) == _pub(derive_secret(seed, PURPOSE, 0, i)) for i in (0, 1, 7))
    wallet = UplinkWallet(seed, make_backend("esplora", "http://127.0.0.1:9/"), NETWORK)
    channel_pubs = {bytes(keychain.key(i).pub) for i in range(64)}
    assert bytes(wallet.key.pub) not in channel_pubs
    assert _pub(wallet.channel_secret(0)) not in channel_pubs | {bytes(wallet.key.pub)}
    assert wallet.channel_secret(0) != wallet.channel_secret(1)
    # the same seed gives the same address after a restart; another seed another one
    assert UplinkWallet(seed, wallet.chain, NETWORK).address == wallet.address
    assert UplinkWallet(secrets.token_bytes(32), wallet.chain, NETWORK).address != wallet.address
    assert wallet.address.startswith("rb1q") and "secret" not in repr(wallet)


def _pub(secret: bytes) -> bytes:
    from bitcoin.wallet import CKey

    return bytes(CKey(secret, compressed=True).pub)


@pytest.mark.regtest
def test_the_wallet_sees_a_deposit_in_the_mempool(chain: ChainBackend, faucet: Faucet):
    wallet = _wallet(chain)
    assert wallet.coins() == [] and wallet.balance().total == 0
    coin, _ = faucet.pay(wallet.script, 300_000)
    [seen] = wallet.coins()
    assert (seen.outpoint.txid, seen.outpoint.vout, seen.value) == (coin.txid, coin.vout, 300_000)
    assert seen.script_pubkey == wallet.script and seen.segwit
    assert wallet.balance().to_json() == {"confirmed_sat": 0, "unconfirmed_sat": 300_000, "total_sat": 300_000}


@pytest.mark.regtest
@pytest.mark.parametrize("chain", [pytest.param("core", marks=BCOIN_INDEX_BROKEN), "esplora"], indirect=True)
def test_the_wallet_sees_a_confirmed_deposit(chain: ChainBackend, bcoin: BcoinNode, faucet: Faucet):
    wallet = _wallet(chain)
    faucet.pay(wallet.script, 300_000)
    bcoin.mine(1, key_address(new_key()))
    assert wallet.balance().to_json() == {"confirmed_sat": 300_000, "unconfirmed_sat": 0, "total_sat": 300_000}
    [unspent] = chain.address_unspent(wallet.address)
    assert unspent.height == bcoin.height()
    # another address's coins are not the wallet's
    faucet.pay(p2wpkh_script(new_key().pub), 50_000)
    assert [c.value for c in wallet.coins()] == [300_000]


@pytest.mark.regtest
def test_an_uplink_channel_funded_from_the_wallet_passes_consensus(chain: ChainBackend, bcoin: BcoinNode,
                                                                     faucet: Faucet, hotspot: Hotspot,
                                                                     tmp_path: Path):
    wallet = _wallet(chain)
    faucet.pay(wallet.script, 120_000)
    faucet.pay(wallet.script, 80_000)  # two coins: the funding takes what it needs, largest first
    payer = PayerSession(hotspot.portal, chain.tip_height, refund_address=wallet.address)
    payer.open(150_000, client_secret=wallet.channel_secret(0))
    assert bytes(payer.channel.client_key.pub) == _pub(wallet.channel_secret(0))
    refund_path = tmp_path / "refund.hex"
    payer.fund_from_coins(wallet.coins(), wallet.script, refund_path=refund_path)
    funding = hotspot.manager.get(payer.channel_id or "").funding
    assert funding is not None
    funding_tx = verify_on_node(bcoin, funding.txid)  # both wallet inputs, by Core's interpreter
    assert len(funding_tx.vin) == 2 and funding_tx.vout[0].nValue == 150_000
    # the refund (signed before the funding left) spends the contract under Core's rules too
    refund = CTransaction.deserialize(bytes.fromhex(refund_path.read_text().strip()))
    verify_spends(refund, [(payer.channel.contract.script_pubkey, 150_000)])
    assert bytes(refund.vout[0].scriptPubKey) == wallet.script  # refunds come back to the wallet
    # the spent coins are gone at once (the mempool spend is seen); the change is the wallet's
    [left] = wallet.coins()
    assert left.outpoint.txid == funding.txid and left.value == funding_tx.vout[1].nValue
    assert wallet.balance().unconfirmed == left.value and 0 < 200_000 - 150_000 - left.value < 2_000
    # a payment from the channel works (the router takes the client key derived from the seed)
    assert payer.pay_for(0)["paid"] == hotspot.policy.prepay_step_sat


@pytest.mark.regtest
def test_an_empty_wallet_funds_nothing(chain: ChainBackend, hotspot: Hotspot):
    wallet = _wallet(chain)
    payer = PayerSession(hotspot.portal, chain.tip_height, refund_address=wallet.address)
    payer.open(50_000, client_secret=wallet.channel_secret(3))
    with pytest.raises(ChannelError) as e:
        payer.fund_from_coins(wallet.coins(), wallet.script)
    assert e.value.code == "insufficient_funds"
    assert hotspot.portal.channel(payer.channel_id or "")["state"] == "awaiting_funding"
