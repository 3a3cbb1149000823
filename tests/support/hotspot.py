"""A router's channel side on a real regtest node: manager, journal and HTTP portal, plus
payers that fund from the faucet. Tests drive it through the portal like a phone would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bitcoin.core import CTransaction

from bitmesh.chain import make_backend
from bitmesh.chain.address import p2wpkh_script
from bitmesh.chain.base import ChainBackend
from bitmesh.channel import contract as c
from bitmesh.channel.keys import ChannelKeychain, load_or_create_seed
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.payer import Coin as PayerCoin
from bitmesh.channel.server import ChannelPolicy
from bitmesh.channel.state import Channel
from bitmesh.paying import PayerSession
from bitmesh.portal.api import make_app
from bitmesh.portal.client import PortalClient
from bitmesh.portal.httpserver import HttpServer
from tests.support.bcoin import BcoinNode
from tests.support.coins import NETWORK, Faucet, key_address, new_key
from tests.support.consensus import verify_on_node

TEST_POLICY = dict(
    min_deposit_sat=20_000, max_deposit_sat=1_000_000, expiry_blocks=40, settle_margin_blocks=5,
    zero_conf_max_sat=200_000, min_conf=1, prepay_step_sat=1_000,
)


@dataclass
class Hotspot:
    node: BcoinNode
    faucet: Faucet
    chain: ChainBackend
    policy: ChannelPolicy
    manager: ChannelManager
    http: HttpServer
    state_dir: Path

    @classmethod
    def start(cls, node: BcoinNode, faucet: Faucet, state_dir: Path, **policy) -> Hotspot:
        chain = make_backend("core", node.rpc_url)
        payout = p2wpkh_script(new_key().pub)
        pol = ChannelPolicy(network=NETWORK, payout_script=payout, **{**TEST_POLICY, **policy})
        keychain = ChannelKeychain(load_or_create_seed(state_dir / "seed"))
        manager = ChannelManager(pol, Ledger(state_dir / "channels.journal"), keychain, chain)
        http = HttpServer(make_app(manager, "test-node"), [("127.0.0.1", 0)])
        http.start()
        return cls(node, faucet, chain, pol, manager, http, state_dir)

    def stop(self) -> None:
        self.http.stop()
        self.manager.ledger.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    @property
    def portal(self) -> PortalClient:
        return PortalClient(self.url)

    @property
    def payout_script(self) -> bytes:
        return self.policy.payout_script

    def mine(self, n: int) -> None:
        self.node.mine(n, key_address(new_key()))

    def open_payer(self, deposit: int) -> PayerSession:
        payer = PayerSession(self.portal, tip_height=self.chain.tip_height, refund_address=key_address(new_key()))
        payer.open(deposit)
        return payer

    def funded_payer(self, deposit: int) -> PayerSession:
        """A payer whose channel is funded (0-conf) from a fresh coin of its own."""
        key = new_key()
        coin, _ = self.faucet.pay(p2wpkh_script(key.pub), deposit + 5_000)
        payer = self.open_payer(deposit)
        payer.fund_from_coins([PayerCoin(c.Outpoint(coin.txid, coin.vout), coin.value, coin.script, key)],
                              p2wpkh_script(key.pub))
        funding = self.manager.get(payer.channel_id or "").funding
        if funding is not None:  # the funding the router accepted and broadcast: Core's judge too
            verify_on_node(self.node, funding.txid)
        return payer

    def state(self, payer: PayerSession) -> str:
        return self.portal.channel(payer.channel_id or "")["state"]

    def reload_ledger(self) -> dict[str, Channel]:
        """What a restarted service would read back from the journal."""
        ledger = Ledger(self.state_dir / "channels.journal")
        try:
            return ledger.load()
        finally:
            ledger.close()


def mine_to(hotspot: Hotspot, height: int) -> None:
    missing = height - hotspot.node.height()
    if missing > 0:
        hotspot.mine(missing)


def confirmed_tx(node: BcoinNode, txid: str | None) -> CTransaction:
    """A mined transaction, its inputs checked by Bitcoin Core's consensus interpreter as well."""
    info = node.rpc("getrawtransaction", txid, 1)
    assert info.get("confirmations", 0) >= 1, f"{txid} is not confirmed"
    return verify_on_node(node, txid or "")
