"""Money is never lost: a SIGKILL between payments, and a settlement caught by a chain outage."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from bitmesh.chain import make_backend
from bitmesh.chain.address import p2wpkh_script
from bitmesh.chain.retry import Retry
from bitmesh.channel import contract as c
from bitmesh.channel.keys import ChannelKeychain, load_or_create_seed
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.payer import Coin as PayerCoin
from bitmesh.channel.state import Phase
from bitmesh.paying import PayerSession
from bitmesh.portal.client import PortalClient
from tests.support.bcoin import free_port
from tests.support.coins import key_address, new_key
from tests.support.hotspot import Hotspot, confirmed_tx

pytestmark = pytest.mark.regtest

REPO = Path(__file__).resolve().parents[1]


def _write_config(path: Path, node, state_dir: Path, port: int) -> None:
    path.write_text(f"""
config bitmesh 'main'
\toption enabled '1'
\toption interface 'lo'
\toption network 'regtest-bcoin'
\toption payout_address '{key_address(new_key())}'
\toption chain_backend 'core'
\toption core_rpc_url 'http://127.0.0.1:{node.rpc_port}/'
\toption core_rpc_user 'x'
\toption core_rpc_password '{node.api_key}'
\toption state_dir '{state_dir}'
\toption portal_port '{port}'
\toption min_deposit_sat '20000'
\toption max_deposit_sat '1000000'
\toption zero_conf_max_sat '200000'
\toption expiry_blocks '40'
\toption settle_margin_blocks '5'
\toption prepay_step_sat '100'
""")


class ServiceProcess:
    """`bitmesh serve` as procd would run it."""

    def __init__(self, config: Path, port: int, log: Path):
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bitmesh.cli", "serve", "--config", str(self.config),
             "--listen", f"127.0.0.1:{self.port}", "--watch-interval", "0.5", "--no-firewall"],
            cwd=REPO, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/offer", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)
        raise RuntimeError("service did not come up")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def test_sigkill_between_payments_loses_no_acknowledged_payment(bcoin, faucet, tmp_path):
    port = free_port()
    config = tmp_path / "bitmesh"  # a UCI file is named like its package
    _write_config(config, bcoin, tmp_path / "state", port)
    service = ServiceProcess(config, port, tmp_path / "service.log")
    service.start()
    try:
        chain = make_backend("core", bcoin.rpc_url)
        payer = PayerSession(PortalClient(f"http://127.0.0.1:{port}", timeout=5), chain.tip_height,
                             key_address(new_key()))
        deposit = 150_000
        payer.open(deposit)
        key = new_key()
        coin, _ = faucet.pay(p2wpkh_script(key.pub), deposit + 5_000)
        payer.fund_from_coins([PayerCoin(c.Outpoint(coin.txid, coin.vout), coin.value, coin.script, key)],
                              p2wpkh_script(key.pub))
        acked: list[int] = []
        attempted: list[int] = []

        def pay_until_cut() -> None:
            for k in range(1, 1_000):
                attempted.append(k * 100)
                try:
                    acked.append(payer.pay_exact(k * 100)["paid"])
                except Exception:
                    return

        payments = threading.Thread(target=pay_until_cut)
        payments.start()
        time.sleep(random.uniform(0.3, 0.8))
        service.kill()
        payments.join(10)
        assert acked, "no payment was acknowledged before the kill"

        service.start()
        stored = payer.portal.channel(payer.channel_id)
        # Everything acknowledged is there; at most the one in flight was stored unacknowledged.
        assert acked[-1] <= stored["paid"] <= attempted[-1]
        assert stored["state"] == "open"
        payer.channel.acknowledged(stored["paid"])
        final = stored["paid"] + 100
        assert payer.pay_exact(final)["paid"] == final
        closed = payer.close()
        bcoin.mine(1, key_address(new_key()))
        settlement = confirmed_tx(bcoin, closed["settlement_txid"])
        assert settlement.vout[0].nValue == deposit - final
    finally:
        service.stop()


def test_pending_settlement_survives_chain_outage_and_restart(hotspot: Hotspot):
    payer = hotspot.funded_payer(70_000)
    payer.pay_exact(12_000)
    # The chain goes away just before the close: the settlement is signed and journaled anyway.
    hotspot.manager.chain = make_backend("core", f"http://127.0.0.1:{free_port()}/",
                                         retry=Retry(attempts=2, base_delay=0.01))
    settling = hotspot.manager.close(payer.channel_id)
    assert settling.phase is Phase.SETTLING
    assert not hotspot.node.mempool_has(settling.settlement_txid)
    hotspot.stop()  # "reboot": a new manager reads only the journal
    ledger = Ledger(hotspot.state_dir / "channels.journal")
    keychain = ChannelKeychain(load_or_create_seed(hotspot.state_dir / "seed"))
    restarted = ChannelManager(hotspot.policy, ledger, keychain, hotspot.chain)
    assert restarted.get(payer.channel_id).settlement_txid == settling.settlement_txid
    restarted.watch()  # re-broadcasts the pending settlement
    assert hotspot.node.mempool_has(settling.settlement_txid)
    hotspot.mine(1)
    restarted.watch()
    assert restarted.get(payer.channel_id).phase is Phase.SETTLED
    assert confirmed_tx(hotspot.node, settling.settlement_txid).vout[0].nValue == 70_000 - 12_000
    ledger.close()
