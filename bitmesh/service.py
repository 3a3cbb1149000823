"""The BitMesh service: wires config, ledger, keys, chain, channels, firewall and portal.

One process, a few threads: the HTTP servers' per-connection threads and one timer thread
that meters every `meter_interval` seconds and follows the chain every `watch_interval`
(never a busy loop). SIGHUP reloads the config (new prices apply to new channels; paid
clients stay online); SIGTERM stops and removes the firewall table.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bitmesh.chain import make_backend
from bitmesh.chain.address import address_to_script
from bitmesh.chain.base import ChainBackend
from bitmesh.channel.keys import ChannelKeychain, load_or_create_seed
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.server import ChannelPolicy
from bitmesh.config import Settings, load_settings
from bitmesh.control import Control
from bitmesh.errors import ConfigError
from bitmesh.firewall.gate import Gate
from bitmesh.firewall.nft import Nft
from bitmesh.firewall.ruleset import FirewallConfig
from bitmesh.lan import Lan, resolve_lan
from bitmesh.meter import Meter
from bitmesh.portal.api import PortalInfo, make_app
from bitmesh.portal.httpserver import HttpServer
from bitmesh.ubus_object import UbusObject

log = logging.getLogger(__name__)


def policy_from_settings(settings: Settings) -> ChannelPolicy:
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
        sat_per_mb=settings.price_sat_per_mb,
        sat_per_minute=settings.price_sat_per_minute,
    )


def chain_from_settings(settings: Settings) -> ChainBackend:
    if settings.chain_backend == "core":
        return make_backend(
            "core", settings.core_rpc_url, user=settings.core_rpc_user or None,
            password=settings.core_rpc_password or None,
        )
    return make_backend("esplora", settings.esplora_url)


def firewall_from_settings(settings: Settings, lan: Lan) -> FirewallConfig:
    """Walled-garden hosts given by name are resolved once, at (re)load."""
    v4: list[str] = []
    v6: list[str] = []
    for host in settings.walled_garden_host:
        try:
            addrs = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addrs = [ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)]
            except OSError as e:
                log.warning("walled garden host %s not resolved: %s", host, e)
                continue
        for addr in addrs:
            (v4 if addr.version == 4 else v6).append(str(addr))
    return FirewallConfig(
        lan_interface=lan.device, router_ipv4=lan.ipv4, router_ipv6=lan.ipv6, portal_port=settings.portal_port,
        garden_hosts4=tuple(dict.fromkeys(v4)), garden_hosts6=tuple(dict.fromkeys(v6)),
    )


@dataclass
class Service:
    settings: Settings
    manager: ChannelManager
    meter: Meter
    servers: list[HttpServer]
    lan: Lan | None = None
    config_path: Path | None = None
    watch_interval: float = 30.0
    meter_interval: float = 2.0
    ubus: bool = False  # register the `bitmesh` ubus object (OpenWrt: python3-ubus, ubusd)
    _ubus_object: UbusObject | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)

    def _timer_loop(self) -> None:
        next_watch = 0.0
        while not self._stop.is_set():
            try:
                self.meter.tick()
            except Exception:
                log.exception("metering pass failed")
            if time.monotonic() >= next_watch:
                try:
                    self.manager.watch()
                except Exception:
                    log.exception("chain watch failed; next pass in %.0f s", self.watch_interval)
                next_watch = time.monotonic() + self.watch_interval
            self._wake.wait(min(self.meter_interval, self.watch_interval))
            self._wake.clear()

    def start(self) -> None:
        self.meter.restore()
        if self.ubus:
            self._start_ubus()
        threading.Thread(target=self._timer_loop, name="timer", daemon=True).start()
        for server in self.servers:
            server.start()
            log.info("portal listening on port %d", server.port)

    def _start_ubus(self) -> None:
        obj = UbusObject(Control(self))
        try:
            obj.start()
        except (ImportError, OSError, RuntimeError) as e:
            # No ubusd (a Debian box, a test): the portal and the gate work without it.
            log.warning("ubus object not registered (%s); LuCI status and `ubus call bitmesh` unavailable", e)
            return
        self._ubus_object = obj

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.reload, daemon=True).start())
        self.start()
        self._stop.wait()
        self.shutdown()

    def reload(self, strict: bool = False) -> None:
        """Re-read the config. Prices and terms apply to channels opened from now on; paid
        clients keep their access and their counted bytes. A bad config keeps the old one
        (logged; with `strict`, also raised as ConfigError for the caller to show)."""
        if self.config_path is None:
            if strict:
                raise ConfigError("the service runs without a config file: nothing to reload")
            return
        try:
            settings = load_settings(self.config_path)
            policy = policy_from_settings(settings)
            lan = resolve_lan(settings.interface) if self.meter.gate else None
        except Exception as e:
            log.error("reload refused, keeping the running config: %s", e)
            if strict and isinstance(e, ConfigError):
                raise
            if strict:
                raise ConfigError(str(e)) from e
            return
        self.manager.policy = policy
        self.settings = settings
        if self.meter.gate is not None and lan is not None:
            self.meter.gate.reload(firewall_from_settings(settings, lan))
            self.lan = lan
        log.info("config reloaded")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def shutdown(self) -> None:
        if self._ubus_object is not None:
            self._ubus_object.stop()
        for server in self.servers:
            server.stop()
        if self.meter.gate is not None:
            self.meter.gate.stop()
        self.manager.ledger.close()


def build_service(settings: Settings, listen: list[tuple[str, int]] | None = None, watch_interval: float = 30.0,
                  chain: ChainBackend | None = None, firewall: bool = True, config_path: Path | None = None,
                  nft: Nft | None = None, ubus: bool = False) -> Service:
    """`listen` defaults to the LAN addresses only: the portal is never served to the WAN."""
    state_dir = Path(settings.state_dir)
    keychain = ChannelKeychain(load_or_create_seed(state_dir / "seed"))
    ledger = Ledger(state_dir / "channels.journal")
    manager = ChannelManager(policy_from_settings(settings), ledger, keychain, chain or chain_from_settings(settings))
    lan = resolve_lan(settings.interface) if firewall or not listen else None
    gate = Gate(firewall_from_settings(settings, lan), nft=nft) if firewall and lan else None
    meter = Meter(manager, gate)
    if listen is None:
        assert lan is not None
        listen = [(addr, settings.portal_port) for addr in (lan.ipv4, lan.ipv6) if addr]
    url = f"http://{lan.ipv4}:{settings.portal_port}/" if lan and lan.ipv4 else None
    node_id = bytes(keychain.key(0x7FFFFFFF).pub).hex()[:16]  # stable per seed, reveals nothing
    app = make_app(manager, node_id, meter, info=PortalInfo(settings.portal_title, settings.portal_text, url))
    servers = [HttpServer(app, host, port) for host, port in listen]
    return Service(settings, manager, meter, servers, lan=lan, config_path=config_path,
                   watch_interval=watch_interval, ubus=ubus)
