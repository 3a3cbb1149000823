"""The owner's control plane in plain Python: what `ubus call bitmesh ...` and LuCI show and do.

Every method answers a JSON-able dict; a refusal raises BitMeshError (the ubus adapter turns
it into `{"error": {"code", "message"}}`). Nothing here shows a secret: no seed, no key, no
RPC password, no credentials inside a URL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from bitmesh import __version__
from bitmesh.channel.history import payout_of
from bitmesh.channel.state import Channel, Phase
from bitmesh.errors import BitMeshError, RequestError
from bitmesh.firewall.ruleset import normalize_mac

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from bitmesh.service import Service

log = logging.getLogger(__name__)

RECENT_SETTLEMENTS = 20
CHANNELS_LISTED = 200  # newest first; the archive keeps the rest (and memory its newest 200)


def redact_url(url: str) -> str:
    """The URL without user and password (an RPC URL may carry them)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


__all__ = ["Control", "channel_summary", "events_for", "payout_of", "redact_url"]


def channel_summary(channel: Channel, owed: int | None) -> dict:
    return {
        "channel_id": channel.id,
        "state": channel.phase.value,
        "deposit": channel.deposit,
        "paid": channel.paid,
        "owed": owed,
        "client_mac": channel.client_mac,
        "client_ip": channel.client_ip,
        "funding": str(channel.funding) if channel.funding else None,
        "expiry": channel.expiry,
        "settlement_txid": channel.settlement_txid,
        "payout_txid": channel.payout_txid,  # the owner's share moved on to the payout address
        "close_reason": channel.close_reason or None,
        "created_at": channel.created_at,
    }


Event = tuple[str, dict]


def events_for(new: Channel, old: Channel | None) -> list[Event]:
    """The `bitmesh.*` events a channel change announces: a session starts when a channel
    opens, stops when it leaves the open phase, and a settlement is announced once signed."""
    events: list[Event] = []
    was_open = old is not None and old.phase is Phase.OPEN
    if new.phase is Phase.OPEN and not was_open:
        events.append(("bitmesh.session.start", {"channel_id": new.id, "mac": new.client_mac, "ip": new.client_ip,
                                                 "deposit": new.deposit}))
    if was_open and new.phase is not Phase.OPEN:
        events.append(("bitmesh.session.stop", {"channel_id": new.id, "mac": new.client_mac, "ip": new.client_ip,
                                                "state": new.phase.value, "reason": new.close_reason,
                                                "paid": new.paid, "bytes_used": new.bytes_used,
                                                "seconds_used": new.seconds_used}))
    if new.settlement_txid and (old is None or old.settlement_txid != new.settlement_txid):
        events.append(("bitmesh.settlement", {"channel_id": new.id, "txid": new.settlement_txid,
                                              "payout_sat": payout_of(new), "paid": new.paid}))
    return events


@dataclass
class Control:
    service: Service

    # --- reading ---------------------------------------------------------------------------

    def status(self) -> dict:
        s = self.service.settings
        manager = self.service.manager
        # the chain as the last watch pass saw it: asking the backend here could hold the one
        # ubus thread (and every other call) through its retries
        view = manager.last_chain_view
        url = s.esplora_url if s.chain_backend == "esplora" else s.core_rpc_url
        open_channels = [ch for ch in manager.channels() if ch.phase is Phase.OPEN]
        lan = self.service.lan
        return {
            "running": True,
            "version": __version__,
            "enabled": s.enabled,
            "network": s.network,
            "interface": s.interface,  # the logical network (e.g. lan) ...
            "device": lan.device if lan else None,  # ... and its device (e.g. br-lan)
            "portal_url": f"http://{lan.ipv4}:{s.portal_port}/" if lan and lan.ipv4 else None,
            "firewall": self.service.meter.gate is not None,
            "chain": {"backend": s.chain_backend, "url": redact_url(url),
                      "ok": view is not None and manager.chain_error is None,
                      "tip_height": view.tip_height if view else None,
                      "checked_at": int(view.taken_at) if view else None, "error": manager.chain_error},
            "clients_online": sum(1 for c in self._client_rows() if c["state"] == "open"),
            "channels_open": len(open_channels),
            # what new channels open at now (demand pricing moves it; open channels keep theirs)
            "price_sat_per_mb": manager.policy.sat_per_mb,
            "price_sat_per_minute": manager.policy.sat_per_minute,
            "demand_pricing": s.demand_pricing,
            "base_price_sat_per_mb": s.price_sat_per_mb,  # the owner's price (at the target load)
            "base_price_sat_per_minute": s.price_sat_per_minute,
            "prepay_step_sat": s.prepay_step_sat,
            "payout_address": s.payout_address,
            # uplink mode (resale): the wallet's deposit address, balance, budget and prices; None when off
            "uplink": self._uplink_status(),
        }

    def _uplink_status(self) -> dict | None:
        runner = getattr(self.service, "uplink", None)
        return None if runner is None else runner.uplink.status()

    def _client_rows(self) -> list[dict]:
        meter = self.service.meter
        step = self.service.manager.policy.prepay_step_sat
        rows = []
        for ch in self.service.manager.channels():
            if ch.phase is not Phase.OPEN or not ch.paid:
                continue
            session = meter.session(ch).to_json(step)
            rows.append({"mac": ch.client_mac, "ip": ch.client_ip, **{k: session[k] for k in (
                "channel_id", "state", "bytes_used", "seconds_used", "paid", "owed", "credit", "deposit",
                "bytes_remaining", "seconds_remaining")}})
        return rows

    def clients(self) -> dict:
        return {"clients": self._client_rows()}

    def _owed(self, channel: Channel) -> int | None:
        if channel.phase is Phase.OPEN and channel.paid:
            return self.service.meter.session(channel).owed
        return channel.owed

    def channels(self) -> dict:
        """Live channels and, from the archive, the newest final ones that left the journal."""
        manager = self.service.manager
        live = manager.channels()
        ids = {ch.id for ch in live}
        archived = [a.channel for a in manager.history.recent if a.channel.id not in ids]
        newest = sorted([*live, *archived], key=lambda ch: ch.created_at, reverse=True)
        return {"channels": [channel_summary(ch, self._owed(ch)) for ch in newest[:CHANNELS_LISTED]]}

    def earnings(self) -> dict:
        """Live channels plus the archive's totals: every settlement ever confirmed counts."""
        manager = self.service.manager
        live = manager.channels()
        # Read after the live list: a channel archived in between is in both (last_batch), once.
        history = manager.history
        settled, n_settled = history.settled_sat, history.settled_channels
        settling = n_settling = n_open = 0
        open_paid = open_owed = 0
        recent = [{"channel_id": a.channel.id, "txid": a.channel.settlement_txid, "payout_sat": a.payout,
                   "state": a.channel.phase.value, "updated_at": a.channel.updated_at} for a in history.settlements]
        for ch in live:
            if ch.id in history.last_batch:
                continue
            if ch.phase is Phase.OPEN:
                n_open += 1
                open_paid += ch.paid
                open_owed += self._owed(ch) or 0
            elif ch.phase in (Phase.SETTLED, Phase.SETTLING) and ch.settlement_txid:
                payout = payout_of(ch)
                if ch.phase is Phase.SETTLED:
                    settled, n_settled = settled + payout, n_settled + 1
                else:
                    settling, n_settling = settling + payout, n_settling + 1
                recent.append({"channel_id": ch.id, "txid": ch.settlement_txid, "payout_sat": payout,
                               "state": ch.phase.value, "updated_at": ch.updated_at})
        recent.sort(key=lambda r: r["updated_at"], reverse=True)
        return {
            "settled_sat": settled, "settled_channels": n_settled,
            "settling_sat": settling, "settling_channels": n_settling,
            "open_paid_sat": open_paid, "open_owed_sat": open_owed, "open_channels": n_open,
            "recent": recent[:RECENT_SETTLEMENTS],
        }

    def fleet(self) -> dict:
        """The owner's routers as they publish over MQTT (bitmesh.market.fleet): kept by the running
        publisher from its subscription; `mqtt_disabled` when MQTT is off."""
        market = getattr(self.service, "market", None)
        if market is None:
            raise BitMeshError("the fleet view needs the marketplace over MQTT (mqtt_enabled 1), not running",
                               code="mqtt_disabled")
        return market.fleet_summary()

    # --- acting ----------------------------------------------------------------------------

    def kick(self, mac: str) -> dict:
        """Cut a client off now: its open channels are settled for what it used (the unused
        part goes back to it) and the kernel forgets it."""
        wanted = _mac_argument(mac)
        manager = self.service.manager
        kicked = []
        for ch in manager.channels():
            if ch.client_mac == wanted and ch.phase in (Phase.OPEN, Phase.FUNDING_UNCONFIRMED):
                manager.close(ch.id, reason="owner_kick", wait_for_chain=False)
                kicked.append(ch.id)
        gate = self.service.meter.gate
        if gate is not None and wanted in gate.clients():
            gate.revoke(wanted)  # a grant with no open channel behind it (should not happen)
        elif not kicked:
            raise BitMeshError(f"no client {wanted} is online", code="client_unknown")
        log.info("owner kicked %s (channels %s)", wanted, ", ".join(kicked) or "none")
        if kicked:
            self.service.watch_soon()  # broadcasts the settlements from the timer thread
        return {"kicked": kicked}

    def close_channel(self, channel_id: str) -> dict:
        if not isinstance(channel_id, str) or not channel_id:
            raise RequestError("channel_id: required")
        ch = self.service.manager.close(channel_id, reason="owner_close", wait_for_chain=False)
        self.service.watch_soon()
        return {"channel_id": ch.id, "state": ch.phase.value, "settlement_txid": ch.settlement_txid}

    def reload(self) -> dict:
        """Re-read the config now; `restart_required` names the changed options that only a
        restart applies (`/etc/init.d/bitmesh reload` restarts for those by itself)."""
        return {"reloaded": True, "restart_required": self.service.reload(strict=True)}


def _mac_argument(mac: object) -> str:
    if not isinstance(mac, str):
        raise RequestError("mac: required")
    return normalize_mac(mac)  # ClientAddressError for anything else

