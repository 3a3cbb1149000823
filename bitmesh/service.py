"""The BitMesh service: wires config, ledger, keys, chain, channels, firewall and portal.

One process, a few threads: the portal's I/O thread and its worker pool (one for all listening
addresses), the nft monitor, the captive DNS supervisor, the clone watch, and one timer thread
that meters every `meter_interval` seconds and follows the chain every `watch_interval`
(never a busy loop). SIGHUP reloads the config (new prices apply to new channels; paid
clients stay online); the options in RESTART_OPTIONS only take effect at the next start, and a
reload names those that changed. SIGTERM stops and removes the firewall table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import select
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
from bitmesh.channel.state import Phase
from bitmesh.config import Settings, load_settings
from bitmesh.control import Control
from bitmesh.errors import ConfigError
from bitmesh.firewall.captive_dns import CaptiveDns, CaptiveResolver
from bitmesh.firewall.gate import Gate
from bitmesh.firewall.nft import Nft
from bitmesh.firewall.ruleset import FirewallConfig
from bitmesh.lan import Lan, resolve_lan
from bitmesh.memory import release_free_memory
from bitmesh.meter import Meter
from bitmesh.portal.api import PortalInfo, make_app
from bitmesh.portal.httpserver import HttpServer
from bitmesh.ubus_object import UbusObject

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from bitmesh.market.pricing import DemandPricing, PriceState
    from bitmesh.market.publisher import MarketPublisher
    from bitmesh.uplink.service import UplinkRunner

log = logging.getLogger(__name__)

PRICING_INTERVAL = 60.0  # seconds between demand pricing passes (the step itself is per minute of clock)


def policy_from_settings(settings: Settings) -> ChannelPolicy:
    return ChannelPolicy(
        network=settings.network,
        payout_script=address_to_script(settings.payout_address, settings.network),
        min_deposit_sat=settings.min_deposit_sat,
        max_deposit_sat=settings.max_deposit_sat,
        expiry_blocks=settings.expiry_blocks,
        settle_margin_blocks=settings.settle_margin_blocks,
        zero_conf_max_sat=settings.zero_conf_max_sat,
        zero_conf_total_max_sat=settings.zero_conf_total_max_sat,
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
    """The walled garden's host:port pairs; hosts given by name are resolved once, at (re)load."""
    garden: list[tuple[str, int]] = []
    for host, port in settings.garden:
        try:
            addrs = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, port)]
            except OSError as e:
                log.warning("walled garden host %s not resolved: %s", host, e)
                continue
        garden += [(str(addr), port) for addr in addrs]
    return FirewallConfig(
        lan_interface=lan.device, router_ipv4=lan.ipv4, router_ipv6=lan.ipv6, portal_port=settings.portal_port,
        garden=tuple(dict.fromkeys(garden)),
    )


def captive_dns_from(firewall: FirewallConfig, settings: Settings) -> CaptiveDns:
    """The captive resolver on the gate's LAN addresses, forwarding the walled garden's names."""
    return CaptiveDns.of(firewall, (host for host, _port in settings.garden))


# Options a running service cannot take over on SIGHUP: the portal's sockets and the URL it
# redirects to, the splash texts rendered into the portal, the LAN it gates, the bitcoin network,
# the chain backend and its credentials, the folder of keys and journal; `enabled` 0 means stop.
# files/etc/init.d/bitmesh restarts the service when one of these changes (its RESTART_OPTIONS
# lists the same names but `enabled`; tests/test_init_script.py checks).
RESTART_OPTIONS = (
    "enabled", "interface", "network", "chain_backend", "esplora_url", "core_rpc_url", "core_rpc_user",
    "core_rpc_password", "state_dir", "portal_port", "portal_title", "portal_text",
)


# Left by `/etc/init.d/bitmesh stop` (not by a restart): the service then removes its table on exit.
STOP_MARKER = Path("/var/run/bitmesh.stop")


def restart_required(running: Settings, new: Settings) -> list[str]:
    """The options that differ between the running settings and `new` but only a restart applies."""
    return [name for name in RESTART_OPTIONS if getattr(running, name) != getattr(new, name)]


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
    ubus: bool = False  # register the `bitmesh` ubus objects (OpenWrt: python3-ubus, ubusd)
    ubus_socket: str | None = None  # ubusd's socket; None: libubus's default
    captive_dns: CaptiveResolver | None = None  # the DNS of clients without access (with the gate)
    _ubus_object: UbusObject | None = None
    market: MarketPublisher | None = None  # MQTT on: offer, state, events (bitmesh.market, loaded then only)
    uplink: UplinkRunner | None = None  # uplink mode on: buys upstream, resells (bitmesh.uplink, loaded then only)
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _signal_wake: socket.socket | None = None  # what wakes run()'s main thread (signals, stop())
    _next_watch: float = 0.0  # monotonic time of the next chain watch pass
    _reload_lock: threading.Lock = field(default_factory=threading.Lock)
    _restart_required: tuple[str, ...] = ()
    pricing_interval: float = PRICING_INTERVAL
    _pricing: DemandPricing | None = None  # demand pricing on: the owner's bands
    _price_state: PriceState | None = None
    _next_price_eval: float = 0.0  # monotonic time of the next demand pricing pass

    def watch_soon(self) -> None:
        """Run a chain watch pass now (e.g. to broadcast a settlement the owner just signed)."""
        self._next_watch = 0.0
        self._wake.set()

    def _timer_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.meter.tick()
            except Exception:
                log.exception("metering pass failed")
            if self._pricing is not None and time.monotonic() >= self._next_price_eval:
                try:
                    self._reprice()
                except Exception:
                    log.exception("demand pricing pass failed")
            if time.monotonic() >= self._next_watch:
                self._next_watch = time.monotonic() + self.watch_interval
                try:
                    self.manager.watch()
                except Exception:
                    log.exception("chain watch failed; next pass in %.0f s", self.watch_interval)
            release_free_memory()  # what the pass and the portal freed goes back (glibc; ~0.05 ms)
            self._wake.wait(min(self.meter_interval, self.watch_interval))
            self._wake.clear()

    def paid_clients(self) -> int:
        """The load demand pricing follows: clients holding paid access now (open and paid)."""
        return sum(1 for ch in self.manager.channels() if ch.phase is Phase.OPEN and ch.paid)

    def _configure_pricing(self, settings: Settings) -> None:
        """Demand pricing from `settings` (start, reload): the prices start again from the owner's
        base prices (the policy just built from the settings); off: nothing of it is loaded."""
        if not settings.demand_pricing:
            self._pricing = self._price_state = None
            return
        from bitmesh.market import pricing  # lazily: the router loads it only when it is on

        now = time.monotonic()
        self._pricing = pricing.pricing_from_settings(settings)
        self._price_state = pricing.start_state(self._pricing, int(now * 1000))
        self._next_price_eval = now + self.pricing_interval
        log.info("demand pricing on at t=%d ms: %d sat/MB, %d sat/min; capacity %d clients",
                 int(now * 1000), *self._price_state.prices(), self._pricing.capacity_clients)

    def _reprice(self) -> None:
        """One demand pricing pass: new channels get the next price (open ones keep theirs)."""
        from bitmesh.market import pricing

        with self._reload_lock:  # never between a reload's policy and its pricing state
            if self._pricing is None or self._price_state is None:
                return
            now = time.monotonic()
            self._next_price_eval = now + self.pricing_interval
            clients = self.paid_clients()
            old = self._price_state.prices()
            self._price_state = pricing.step(self._pricing, self._price_state, clients, int(now * 1000))
            mb, minute = self._price_state.prices()
            if (mb, minute) == old:
                return
            self.manager.policy = dataclasses.replace(self.manager.policy, sat_per_mb=mb, sat_per_minute=minute)
        log.info("demand pricing at t=%d ms: %d of %d paid clients: %d -> %d sat/MB, %d -> %d sat/min",
                 int(now * 1000), clients, self._pricing.capacity_clients, old[0], mb, old[1], minute)
        self.offer_changed()  # the MQTT offer, where that part is on

    def start(self) -> None:
        self._configure_pricing(self.settings)
        self.meter.restore()
        if self.captive_dns is not None:
            self.captive_dns.start()
        if self.meter.gate is not None:
            self.meter.gate.watch()  # fw4 flush & co.: the table is back within milliseconds
        if self.ubus:
            self._start_ubus()
        self._start_market()
        self._start_uplink()
        threading.Thread(target=self._timer_loop, name="timer", daemon=True).start()
        for server in self.servers:
            server.start()
            log.info("portal listening on port %d", server.port)

    def _start_market(self) -> None:
        """MQTT on: publish the offer, state and events (a broker away never stops the gate: paho
        connects in its own thread and the bus queues); off: nothing of it is imported."""
        if not self.settings.mqtt_enabled:
            return
        try:
            from bitmesh.market.publisher import MarketPublisher

            self.market = MarketPublisher(self).start()
        except Exception as e:  # no paho, a bad CA file ...: the hotspot goes on without it
            log.error("marketplace not started: %s", e)
            self.market = None

    def _start_uplink(self) -> None:
        """Uplink mode on: buy upstream access and resell it (its own thread); off: nothing of it
        is imported. A setting that cannot work (no upstream portal) leaves the hotspot without it."""
        if not self.settings.uplink_enabled:
            return
        from bitmesh.uplink.service import UplinkRunner, uplink_from_settings

        try:
            self.uplink = UplinkRunner(self, uplink_from_settings(self.settings, self.manager.chain)).start()
        except Exception as e:
            log.error("uplink mode not started: %s", e)

    def _stop_uplink(self) -> None:
        if self.uplink is not None:
            uplink, self.uplink = self.uplink, None
            uplink.stop()

    def _stop_market(self) -> None:
        if self.market is not None:
            market, self.market = self.market, None
            market.stop()

    def offer_changed(self) -> None:
        """The advertised terms changed (reload, demand pricing): sign and publish the offer now.
        Nothing when MQTT is off."""
        if self.market is not None:
            self.market.offer_changed()

    def _start_ubus(self) -> None:
        obj = UbusObject(Control(self), socket_path=self.ubus_socket)
        try:
            obj.start()
        except ImportError as e:
            # No python3-ubus (a Debian box): the portal and the gate work without it.
            log.warning("ubus objects not registered (%s); LuCI status and `ubus call bitmesh` unavailable", e)
            return
        self._ubus_object = obj

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config."""
        # Python runs signal handlers in the main thread only, but the kernel may hand a signal
        # to any thread: one that lands on another thread while the main one sleeps in a lock
        # would wait there until the next signal (a procd reload lost). The C handler writes
        # every signal to the wakeup fd, whatever thread took it: the main thread sleeps on it.
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._signal_wake = wake_w
        previous = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.reload, daemon=True).start())
        try:
            STOP_MARKER.unlink(missing_ok=True)  # a stop asked for before this start is done with
            self.start()
            self._reload_if_changed()
            while not self._stop.is_set():
                select.select([wake_r], [], [])  # handlers run as soon as this returns
                with contextlib.suppress(BlockingIOError):
                    while wake_r.recv(512):
                        pass
        finally:
            signal.set_wakeup_fd(previous)
            self._signal_wake = None
            wake_r.close()
            wake_w.close()
        self.shutdown(keep_table=self._exiting_for_a_restart())

    def _exiting_for_a_restart(self) -> bool:
        """SIGTERM comes for a restart (procd applying a changed option, `restart`, an upgrade) or
        for a stop (`/etc/init.d/bitmesh stop`, which leaves STOP_MARKER, or Enable unticked). Only
        a stop may open the LAN; across a restart the table stays (fail-closed)."""
        if STOP_MARKER.exists():
            STOP_MARKER.unlink(missing_ok=True)
            return False
        if self.config_path is None:
            return False
        try:
            return load_settings(self.config_path).enabled
        except Exception:
            return True  # unreadable now: keep clients captive rather than open the LAN

    @property
    def restart_required(self) -> list[str]:
        """Options changed in the config since the start that only a restart applies (they keep
        their running values until then)."""
        return list(self._restart_required)

    def reload(self, strict: bool = False) -> list[str]:
        """Re-read the config (SIGHUP, `ubus call bitmesh reload`). Prices and terms apply to
        channels opened from now on; paid clients keep their access and their counted bytes.
        Options in RESTART_OPTIONS keep their running values: the ones that changed are logged
        and returned (also `restart_required`), for the caller to restart the service. A bad
        config keeps the old one (logged; with `strict`, also raised as ConfigError)."""
        with self._reload_lock:  # two HUPs in a row: one reload after the other
            return self._reload(strict)

    def _reload(self, strict: bool) -> list[str]:
        if self.config_path is None:
            if strict:
                raise ConfigError("the service runs without a config file: nothing to reload")
            return []
        try:
            new = load_settings(self.config_path)
            policy_from_settings(new)
        except Exception as e:
            log.error("reload refused, keeping the running config: config_invalid: %s", e)
            if strict and isinstance(e, ConfigError):
                raise
            if strict:
                raise ConfigError(str(e)) from e
            return self.restart_required
        pending = restart_required(self.settings, new)
        # What runs from now on: the new values, but the running ones where only a restart helps.
        applied = dataclasses.replace(new, **{name: getattr(self.settings, name) for name in pending})
        gate = self.meter.gate
        try:
            policy = policy_from_settings(applied)
            firewall = firewall_from_settings(applied, self.lan) if gate is not None and self.lan else None
        except Exception as e:  # e.g. a payout address of the new network while the old one runs
            self._restart_required = tuple(pending)
            log.warning("config not reloaded: it only fits after a restart (%s): restart required for %s", e,
                        ", ".join(pending))
            return pending
        uplink_kept = self.uplink is not None and _options(self.settings, "uplink_") == _options(applied, "uplink_")
        self.manager.policy = self.uplink.terms(policy) if uplink_kept else policy  # resale terms kept
        previous, self.settings = self.settings, applied
        self._configure_pricing(applied)  # back to the base prices, within the (new) bands
        if firewall is not None and gate is not None and firewall != gate.config:
            gate.reload(firewall)  # walled garden: one atomic replace, counters carried
        if self.captive_dns is not None and gate is not None:
            self.captive_dns.update(captive_dns_from(gate.config, applied))  # garden names
        self._restart_required = tuple(pending)
        if _options(previous, "uplink_") != _options(applied, "uplink_"):
            self._stop_uplink()  # the book on disk carries the budget spent over to the new one
            self._start_uplink()
        if _options(previous, "mqtt_") != _options(applied, "mqtt_"):
            self._stop_market()  # another broker, login or prefix: a new connection (and will)
            self._start_market()
        else:
            self.offer_changed()  # prices and terms as reloaded
        if pending:
            log.warning("config reloaded; a restart is required to apply %s (/etc/init.d/bitmesh restart)",
                        ", ".join(pending))
        else:
            log.info("config reloaded")
        return pending

    def _reload_if_changed(self) -> None:
        """The init script sends no SIGHUP before our handler is installed (it would kill us), so
        a change saved while we were starting is picked up here: reload if the file changed since
        it was read at start."""
        if self.config_path is None:
            return
        try:
            changed = load_settings(self.config_path) != self.settings
        except Exception:
            changed = True  # reload() logs what is wrong with it
        if changed:
            self.reload()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._signal_wake is not None:  # run() sleeps on it
            with contextlib.suppress(OSError):
                self._signal_wake.send(b"\0")

    def shutdown(self, keep_table: bool = False) -> None:
        """Stop serving. The firewall table is removed (the LAN is open again), or with
        `keep_table` left for the next process to take over."""
        gate = self.meter.gate
        if gate is not None and keep_table:
            gate.detach()  # first: nothing restores or changes the table from here on
            log.info("exiting for a restart: table inet bitmesh stays loaded meanwhile")
        self._stop_market()  # first: the offline state goes out while the portal still answers
        self._stop_uplink()
        if self._ubus_object is not None:
            self._ubus_object.stop()
        for server in self.servers:
            server.stop()
        if self.captive_dns is not None:
            self.captive_dns.stop()  # a restart starts its own; meanwhile the captive get no DNS
        if gate is not None and not keep_table:
            gate.stop()
        self.manager.ledger.close()


def _options(settings: Settings, prefix: str) -> tuple:
    return tuple(getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name.startswith(prefix))


def build_service(settings: Settings, listen: list[tuple[str, int]] | None = None, watch_interval: float = 30.0,
                  chain: ChainBackend | None = None, firewall: bool = True, config_path: Path | None = None,
                  nft: Nft | None = None, ubus: bool = False, ubus_socket: str | None = None,
                  pricing_interval: float = PRICING_INTERVAL) -> Service:
    """`listen` defaults to the LAN addresses only: the portal is never served to the WAN."""
    state_dir = Path(settings.state_dir)
    ledger = Ledger(state_dir / "channels.journal")
    # Only a first start (no journal, no archive) creates a seed: with channels on record a missing
    # seed stops the start (seed_missing), and a wrong one too (seed_mismatch, ChannelManager).
    keychain = ChannelKeychain(load_or_create_seed(state_dir / "seed", create=not ledger.on_record()))
    manager = ChannelManager(policy_from_settings(settings), ledger, keychain, chain or chain_from_settings(settings))
    lan = resolve_lan(settings.interface) if firewall or not listen else None
    gate = Gate(firewall_from_settings(settings, lan), nft=nft) if firewall and lan else None
    captive_dns = CaptiveResolver(captive_dns_from(gate.config, settings)) if gate is not None else None
    meter = Meter(manager, gate)
    if listen is None:
        assert lan is not None
        listen = [(addr, settings.portal_port) for addr in (lan.ipv4, lan.ipv6) if addr]
    url = f"http://{lan.ipv4}:{settings.portal_port}/" if lan and lan.ipv4 else None
    node_id = bytes(keychain.key(0x7FFFFFFF).pub).hex()[:16]  # stable per seed, reveals nothing
    app = make_app(manager, node_id, meter, info=PortalInfo(settings.portal_title, settings.portal_text, url))
    servers = [HttpServer(app, listen)]
    return Service(settings, manager, meter, servers, lan=lan, config_path=config_path,
                   watch_interval=watch_interval, ubus=ubus, ubus_socket=ubus_socket, captive_dns=captive_dns,
                   pricing_interval=pricing_interval)
