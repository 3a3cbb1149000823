"""The BitMesh service: wires config, ledger, keys, chain, channels and the portal together.

One process, a few threads: the HTTP server's per-connection threads and one watcher thread
that wakes on a timer (never a busy loop) to follow the chain.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from bitmesh.chain import make_backend
from bitmesh.chain.address import address_to_script
from bitmesh.chain.base import ChainBackend
from bitmesh.channel.keys import ChannelKeychain, load_or_create_seed
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.server import ChannelPolicy
from bitmesh.portal.api import make_app
from bitmesh.portal.httpserver import HttpServer

log = logging.getLogger(__name__)


def policy_from_settings(settings) -> ChannelPolicy:
    return ChannelPolicy(
        network=settings.network,
        payout_script=address_to_script(settings.payout_address, settings.network),
        min_deposit_sat=settings.min_deposit_sat,
        max_deposit_sat=settings.max_deposit_sat,
        expiry_blocks=settings.expiry_blocks,
        settle_margin_blocks=settings.settle_margin_blocks,
        zero_conf_max_sat=settings.zero_conf_max_sat,
        min_conf=settings.min_conf,
        prepay_step_sat=settings.prepay_step_sat,
    )


def chain_from_settings(settings) -> ChainBackend:
    if settings.chain_backend == "core":
        return make_backend(
            "core", settings.core_rpc_url, user=settings.core_rpc_user or None,
            password=settings.core_rpc_password or None,
        )
    return make_backend("esplora", settings.esplora_url)


@dataclass
class Service:
    manager: ChannelManager
    http: HttpServer
    watch_interval: float = 30.0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.manager.watch()
            except Exception:
                log.exception("chain watch failed; next pass in %.0f s", self.watch_interval)
            self._wake.wait(self.watch_interval)
            self._wake.clear()

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT. Pending settlements are picked up by the first watch."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        watcher = threading.Thread(target=self._watch_loop, name="watch", daemon=True)
        watcher.start()
        self.http.start()
        log.info("portal listening on port %d", self.http.port)
        self._stop.wait()
        self.http.stop()
        self.manager.ledger.close()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


def build_service(settings, host: str, port: int, watch_interval: float = 30.0,
                  chain: ChainBackend | None = None) -> Service:
    state_dir = Path(settings.state_dir)
    keychain = ChannelKeychain(load_or_create_seed(state_dir / "seed"))
    ledger = Ledger(state_dir / "channels.journal")
    manager = ChannelManager(policy_from_settings(settings), ledger, keychain, chain or chain_from_settings(settings))
    node_id = bytes(keychain.key(0x7FFFFFFF).pub).hex()[:16]  # stable per seed, reveals nothing
    http = HttpServer(make_app(manager, node_id), host, port)
    return Service(manager=manager, http=http, watch_interval=watch_interval)
