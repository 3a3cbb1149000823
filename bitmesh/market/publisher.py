"""The node's side of the marketplace: its offer, state, totals and events, onto the bus.

The service creates one when `mqtt_enabled` is set (and imports this module only then). Prices
are read from `service.manager.policy` each time an offer is signed, so a reload or the demand
pricing (Service.offer_changed) is advertised at once. Events come from the channel manager's
listeners, which run after the journal's fsync: what is announced is on disk. Neither the
portal nor the meter waits on MQTT: a listener only appends to the bus's queue.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from bitmesh import uci
from bitmesh.channel.state import Channel, Phase
from bitmesh.channel.wire import FEE_POLICY
from bitmesh.control import Control
from bitmesh.errors import BitMeshError
from bitmesh.market import events
from bitmesh.market.bus import BrokerConfig, Bus
from bitmesh.market.fleet import FleetStore
from bitmesh.market.identity import node_id_of, node_key
from bitmesh.market.offer import REPUBLISH_MS, Terms, encode, make_offer, offer_digest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bitmesh.service import Service

log = logging.getLogger(__name__)

WIRELESS_CONFIG = Path("/etc/config/wireless")
DEFAULT_CAPACITY = 32  # paid clients at once, where the config has no capacity_clients
COALESCE_S = 1.0  # totals and load changes are republished at most once a second


def now_ms() -> int:
    return int(time.time() * 1000)


def gated_ssid(interface: str, path: Path = WIRELESS_CONFIG) -> str:
    """The SSID of the first enabled access point on the gated network, or "" (no Wi-Fi config)."""
    if not path.is_file():
        return ""
    try:
        pkg = uci.load(path)
    except BitMeshError as e:
        log.warning("wireless config not read for the offer's SSID: %s", e)
        return ""
    for s in pkg.sections_of("wifi-iface"):
        v = s.values
        networks = v.get("network", "")
        networks = networks.split() if isinstance(networks, str) else networks
        if interface in networks and v.get("disabled", "0") != "1" and v.get("mode", "ap") == "ap":
            ssid = v.get("ssid", "")
            return ssid if isinstance(ssid, str) else ""
    return ""


def advertised_terms(service: Service, ssid: str = "") -> Terms:
    """What the node advertises now: the prices and limits of `service.manager.policy` (what new
    channels get: a reload or the demand pricing changes it), the load and the capacity."""
    policy, settings = service.manager.policy, service.settings
    lan = service.lan
    url = f"http://{lan.ipv4}:{settings.portal_port}/" if lan and lan.ipv4 else ""
    load = sum(1 for ch in service.manager.channels() if ch.phase is Phase.OPEN and ch.paid)
    return Terms(network=policy.network, sat_per_mb=policy.sat_per_mb, sat_per_minute=policy.sat_per_minute,
                 prepay_step_sat=policy.prepay_step_sat, min_deposit_sat=policy.min_deposit_sat,
                 max_deposit_sat=policy.max_deposit_sat, fee_policy=dict(FEE_POLICY), load=load,
                 capacity=getattr(settings, "capacity_clients", DEFAULT_CAPACITY), portal_url=url, ssid=ssid)


def broker_config(settings, node_id: str) -> BrokerConfig:
    host, port = settings.mqtt_host_port
    return BrokerConfig(host, port, username=settings.mqtt_username, password=settings.mqtt_password,
                        tls=settings.mqtt_tls, ca_file=settings.mqtt_ca_file, client_id=f"bitmesh-{node_id}")


class MarketPublisher:
    def __init__(self, service: Service, wireless: Path = WIRELESS_CONFIG):
        self.service = service
        settings = service.settings
        self._key = node_key(service.manager.keychain)
        self.node_id = node_id_of(bytes(self._key.pub))
        base = f"{settings.mqtt_topic_prefix}/v1/{self.node_id}"
        self.topics = {name: f"{base}/{name}" for name in ("offer", "state", "events", "totals")}
        self._ssid = gated_ssid(settings.interface, wireless)
        self.bus = Bus(broker_config(settings, self.node_id), will=(self.topics["state"], self._state(False)))
        # the fleet view (ubus `fleet`): the retained records of the owner's nodes, read back on
        # this connection (no second client, no polling); bounded by fleet.MAX_NODES
        self.fleet = FleetStore(settings.mqtt_topic_prefix, lambda: service.settings.fleet_nodes)
        self.bus.watch(self.fleet.topics(), self.fleet.keep)
        self._seq = 0
        self._since = now_ms()
        self._payments = 0
        self._lock = threading.Lock()  # seq and counters
        self._due = threading.Condition()
        self._totals_due = False
        self._offer_due = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _state(self, online: bool) -> bytes:
        return encode(events.sign(self._key, "state", events.state_payload(self.node_id, online, now_ms())))

    # --- what is advertised -----------------------------------------------------------------

    def terms(self) -> Terms:
        return advertised_terms(self.service, self._ssid)

    def offer(self) -> dict:
        now = now_ms()
        with self._lock:
            self._seq = max(now, self._seq + 1)  # grows across restarts too: it is the clock's
            seq = self._seq
        offer = make_offer(self._key, self.terms(), seq, now)
        closed = self.service.manager.policy.closed_reason
        if closed is None:
            return offer
        # Not selling (uplink mode: opens refused with not_selling): said under the signature, beside
        # the Terms fields; readers that know `selling` skip the node (verify_offer keeps the field).
        body = {k: v for k, v in offer.items() if k != "sig"} | {"selling": False, "closed_reason": closed}
        return {**body, "sig": self._key.sign(offer_digest(body)).hex()}

    def offer_changed(self) -> None:
        """Sign and publish the offer now (prices or terms changed)."""
        self.bus.set_current(self.topics["offer"], encode(self.offer()))

    def totals(self) -> dict:
        earnings = Control(self.service).earnings()
        with self._lock:
            payments = self._payments
        return events.sign(self._key, "totals", events.totals_payload(
            self.node_id, earnings, earnings["open_channels"], payments, self._since, now_ms()))

    def fleet_summary(self) -> dict:
        return {"node_id": self.node_id, **self.fleet.summary(now_ms())}

    # --- events -------------------------------------------------------------------------------

    def on_channel(self, new: Channel, old: Channel | None) -> None:
        """A manager listener (after the journal's fsync): queue the events, nothing more."""
        built = events.channel_events(new, old, now_ms())
        if not built:
            return
        for event in built:
            self.bus.put_event(self.topics["events"], {"node_id": self.node_id, **event})
        with self._lock:
            self._payments += sum(1 for e in built if e["type"] == "payment")
        with self._due:
            self._totals_due = True
            self._offer_due = self._offer_due or any(e["type"] in ("session_start", "session_stop") for e in built)
            self._due.notify()

    # --- life ---------------------------------------------------------------------------------

    def start(self) -> MarketPublisher:
        self.bus.set_current(self.topics["state"], self._state(True))
        self.offer_changed()
        self.bus.set_current(self.topics["totals"], self.totals())
        self.service.manager.listeners.append(self.on_channel)
        self.bus.start()
        self._thread = threading.Thread(target=self._loop, name="market", daemon=True)
        self._thread.start()
        log.info("marketplace: node %s publishing to %r", self.node_id, self.bus.config)
        return self

    def _loop(self) -> None:
        """Re-sign the offer before it expires; send coalesced totals and load changes."""
        next_offer = time.monotonic() + REPUBLISH_MS / 1000
        while True:
            with self._due:
                # a change noted during the coalescing wait below is due now: its notify is spent
                if not (self._totals_due or self._offer_due or self._stopping):
                    self._due.wait(max(0.0, next_offer - time.monotonic()))
                if self._stopping:
                    return
                totals, offer = self._totals_due, self._offer_due
                self._totals_due = self._offer_due = False
            try:
                if offer or time.monotonic() >= next_offer:
                    self.offer_changed()
                    next_offer = time.monotonic() + REPUBLISH_MS / 1000
                if totals:
                    self.bus.set_current(self.topics["totals"], self.totals())
            except Exception:
                log.exception("marketplace publish failed")
            if totals or offer:  # what comes within a second goes out with the next turn
                with self._due:
                    self._due.wait_for(lambda: self._stopping, COALESCE_S)

    def stop(self) -> None:
        with self._due:
            self._stopping = True
            self._due.notify()
        try:
            self.service.manager.listeners.remove(self.on_channel)
        except ValueError:
            pass
        if self._thread is not None:
            self._thread.join(COALESCE_S + 1)
        self.bus.stop(last=(self.topics["state"], self._state(False)))
