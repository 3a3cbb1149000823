"""Uplink mode with MQTT on: the marketplace's live offers as upstream candidates.

A reader of `<prefix>/v1/+/offer` and `+/state` on the node's broker that keeps only the newest
message of each topic (a router keeps no history), and hands the buyer the offers that verify
(bitmesh.market.browse.select: signature, node_id = topic, network, freshness), whose node is
not offline, that sell (`selling` is not false) and are not this node's own. Whether an offer's
portal is reachable from the WAN, and is the node that signed it, the buyer finds out when it
opens a channel (Uplink._choose). Loaded only when both uplink_enabled and mqtt_enabled are set.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from bitmesh.market.browse import select
from bitmesh.market.bus import Subscription
from bitmesh.market.offer import MAX_OFFER_BYTES, effective_msat_per_mb
from bitmesh.market.publisher import broker_config
from bitmesh.uplink.buyer import portal_host

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bitmesh.config import Settings

log = logging.getLogger(__name__)

MAX_TOPICS = 2000  # nodes x 2 topics kept at most (a broker flooded with node ids costs no more)
MAX_CANDIDATES = 5  # market offers probed per uplink channel opened (the cheapest by their signed price)


def candidates(offers: list[dict], own_node_id: str, hops: set[str] | None = None) -> list[dict]:
    """Pure: of `select`'s verified offers, those that may be bought from, cheapest first, at most
    MAX_CANDIDATES: an http(s) portal (on one of `hops`, the WAN's first hops, when given), a node
    not offline, selling, not us."""
    out = [o for o in offers if o["node_id"] != own_node_id and o.get("selling") is not False
           and o["state"] != "offline" and (host := portal_host(o["portal_url"])) is not None
           and (hops is None or host in hops)]
    out.sort(key=lambda o: (effective_msat_per_mb(o), o["node_id"]))
    return out[:MAX_CANDIDATES]


class OfferBoard(Subscription):
    """The newest offer and state of every node on the broker, verified when read."""

    def __init__(self, settings: Settings, own_node_id: str):
        config = dataclasses.replace(broker_config(settings, own_node_id),
                                     client_id=f"bitmesh-{own_node_id}-uplink")  # the publisher has the plain one
        self.prefix = settings.mqtt_topic_prefix
        super().__init__(config, [f"{self.prefix}/v1/+/offer", f"{self.prefix}/v1/+/state"])
        self.own_node_id = own_node_id
        self.network = settings.network
        self.latest: dict[str, bytes] = {}

    def _on_message(self, client, userdata, msg) -> None:
        payload = bytes(msg.payload)
        with self._new:
            if not payload or len(payload) > MAX_OFFER_BYTES:
                self.latest.pop(msg.topic, None)  # cleared (empty retained), or not an offer anyone could verify
            elif msg.topic in self.latest or len(self.latest) < MAX_TOPICS:
                self.latest[msg.topic] = payload

    def begin(self) -> OfferBoard:
        """Connect in the background (paho reconnects on its own): the service never waits for it."""
        self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        self._client.loop_start()
        return self

    def offers(self, hops: set[str] | None = None) -> list[dict]:
        """The candidates now, on `hops` when given (Uplink's `market`)."""
        with self._new:
            messages = list(self.latest.items())
        found, dropped = select(messages, self.prefix, int(time.time() * 1000), self.network)
        if dropped:
            log.info("upstream offers dropped: %s", ", ".join(f"{k} {n}" for k, n in sorted(dropped.items())))
        return candidates(found, self.own_node_id, hops)
