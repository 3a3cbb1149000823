"""The channel API over HTTP+JSON (bottle). docs/protocol.md is its specification.

Thin transport: parse with bitmesh.channel.wire, act through the ChannelManager, answer
JSON. Every refusal is `{"error": {"code", "message"}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import contextlib
import json
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bottle

from bitmesh.channel import wire
from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.state import Channel, Phase
from bitmesh.errors import ChannelError, RequestError, answer
from bitmesh.meter import Meter
from bitmesh.portal.neighbors import NeighborTable

STATIC_DIR = Path(__file__).with_name("static")


def _json(status: int, payload: dict) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        body=json.dumps(payload, separators=(",", ":")),
        status=status,
        headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def read_json_body() -> dict:
    """The request's JSON object; an oversized body is refused before it is read."""
    length = bottle.request.content_length
    if length > wire.MAX_BODY_BYTES:
        raise RequestError(f"body larger than {wire.MAX_BODY_BYTES} bytes", code="body_too_large", http_status=413)
    body = bottle.request.body.read(wire.MAX_BODY_BYTES + 1)
    return wire.parse_json(body)


def api_route(handler: Callable[..., dict]) -> Callable[..., bottle.HTTPResponse]:
    """Runs a handler; its dict becomes a 200 JSON answer, a BitMeshError a JSON error
    (bitmesh.errors.answer, which the ubus object shares)."""

    def wrapper(*args, **kwargs):
        return _json(*answer(bottle.request.path, lambda: handler(*args, **kwargs)))

    wrapper.__name__ = handler.__name__
    return wrapper


@dataclass(frozen=True)
class PortalInfo:
    """What the splash page and the captive API tell clients about this hotspot."""

    title: str = "BitMesh Wi-Fi"
    text: str = ""
    url: str | None = None  # the splash page's absolute URL; None = from the request's Host


def _caller_ip() -> str:
    addr = bottle.request.remote_addr or ""
    return addr[7:] if addr.startswith("::ffff:") else addr  # IPv4-mapped on a dual-stack socket


# A device's channel that holds, or is about to hold, its grant in the kernel (keyed by MAC).
DEVICE_PHASES = (Phase.FUNDING_UNCONFIRMED, Phase.OPEN)


def install_channel_api(app: bottle.Bottle, manager: ChannelManager, node_id: str, meter: Meter,
                        neighbors: NeighborTable, info: PortalInfo) -> None:
    network = manager.policy.network
    # Checking a device's channels and adding one happen under its lock (striped by MAC, so a slow
    # chain backend during one device's open or funding never holds up another's).
    device_locks = [threading.Lock() for _ in range(64)]

    def device_lock(mac: str) -> threading.Lock:
        return device_locks[zlib.crc32(mac.encode()) % len(device_locks)]

    def gated_mac(ip: str) -> str:
        """The caller's MAC, which the firewall grants access to; with the firewall on, a caller
        the router cannot see on its LAN (routed from elsewhere) could never get access."""
        mac = neighbors.mac_of(ip)
        if meter.metered and not mac:
            raise ChannelError(f"the router sees no MAC address for {ip}: it can only grant access to devices on "
                               "its own LAN segment", code="client_mac_unknown", http_status=403)
        return mac

    def one_channel_per_device(mac: str, except_id: str = "") -> None:
        """One live channel per device: the kernel's grant and counters are the device's, and two
        channels would bill the same bytes twice. Unfunded channels do not count (a device that
        lost one may open another); funding one while another is live is refused too."""
        if not (meter.metered and mac):
            return
        for ch in manager.channels():
            if ch.client_mac == mac and ch.id != except_id and ch.phase in DEVICE_PHASES:
                raise ChannelError(f"this device already has a live channel ({ch.phase.value}); close it first "
                                   "(POST /api/channels/<id>/close; GET /api/session names it)",
                                   code="client_has_channel")

    def channel_json(channel: Channel) -> dict:
        """The channel object, with the `owed` a close would settle for now (as manager.close
        computes it from the meter), or the one its signed settlement charges."""
        if channel.owed is not None:
            owed = channel.owed
        else:
            owed = max(0, min(manager.owed(channel), channel.paid)) if channel.paid else 0
        return wire.channel_json(channel, network, owed=owed)

    def caller_channel() -> Channel | None:
        """The caller's newest channel: same IP, and same MAC where the router can see it."""
        ip = _caller_ip()
        mac = neighbors.mac_of(ip)
        mine = [ch for ch in manager.channels() if ch.client_ip == ip and (not mac or ch.client_mac == mac)]
        live = [ch for ch in mine if not ch.phase.final]
        return max(live or mine, key=lambda ch: ch.created_at, default=None)

    def own_channel(channel_id: str) -> Channel:
        """Closing cuts access: only the client the channel is bound to may do it."""
        channel = manager.get(channel_id)
        if channel.client_ip and channel.client_ip != _caller_ip():
            raise ChannelError("this channel belongs to another client", code="not_your_channel", http_status=403)
        return channel

    @app.get("/api/offer")
    @api_route
    def offer() -> dict:
        extra = {
            "tariff": {"sat_per_mb": manager.policy.sat_per_mb, "sat_per_minute": manager.policy.sat_per_minute},
            # false (`bitmesh serve --no-firewall`): nothing is measured, owed = paid, all of it settled
            "metered": meter.metered,
            "portal_title": info.title,
            "portal_text": info.text,
            "tip_height": manager.chain_view().tip_height,
        }
        return wire.offer_json(manager.policy, node_id, extra)

    @app.post("/api/channels")
    @api_route
    def open_channel() -> dict:
        req = wire.parse_open(read_json_body(), network)
        ip = _caller_ip()
        mac = gated_mac(ip)
        with device_lock(mac) if mac else contextlib.nullcontext():
            one_channel_per_device(mac)
            return channel_json(manager.open_channel(req, client_mac=mac, client_ip=ip))

    @app.get("/api/channels/<channel_id>")
    @api_route
    def get_channel(channel_id: str) -> dict:
        return channel_json(manager.get(channel_id))

    @app.post("/api/channels/<channel_id>/funding")
    @api_route
    def funding(channel_id: str) -> dict:
        mac = manager.get(channel_id).client_mac  # unknown channel: 404 before the body is looked at
        req = wire.parse_funding(read_json_body())
        with device_lock(mac) if mac else contextlib.nullcontext():
            one_channel_per_device(mac, except_id=channel_id)  # before the router broadcasts anything
            return channel_json(manager.submit_funding(channel_id, req))

    @app.post("/api/channels/<channel_id>/payments")
    @api_route
    def payments(channel_id: str) -> dict:
        manager.get(channel_id)
        payment = wire.parse_payment(read_json_body())
        channel = manager.pay(channel_id, payment)
        session = meter.session(channel)
        return {"channel_id": channel.id, "paid": channel.paid, "remaining": channel.deposit - channel.paid,
                "owed": session.owed, "credit": channel.paid - session.owed,
                "bytes_remaining": session.bytes_remaining, "seconds_remaining": session.seconds_remaining}

    @app.post("/api/channels/<channel_id>/close")
    @api_route
    def close(channel_id: str) -> dict:
        own_channel(channel_id)
        return channel_json(manager.close(channel_id))

    @app.get("/api/session")
    @api_route
    def session() -> dict:
        return meter.session(caller_channel()).to_json(manager.policy.prepay_step_sat)

    # --- captive portal detection (RFC 8908 and the OS probes) ---------------------------

    def portal_url() -> str:
        return info.url or f"http://{bottle.request.urlparts.netloc}/"

    def has_access() -> bool:
        return meter.session(caller_channel()).state == "open"

    @app.get("/api/captive")
    def captive() -> bottle.HTTPResponse:
        s = meter.session(caller_channel())
        body = {"captive": s.state != "open", "user-portal-url": portal_url(), "can-extend-session": True}
        if s.state == "open":
            if s.seconds_remaining is not None:
                body["seconds-remaining"] = s.seconds_remaining
            if s.bytes_remaining is not None:
                body["bytes-remaining"] = s.bytes_remaining
        return bottle.HTTPResponse(json.dumps(body), 200, {"Content-Type": "application/captive+json",
                                                            "Cache-Control": "private"})

    online_answers = {  # path -> (status, content type, body) that each OS expects when online
        "/generate_204": (204, "text/plain", ""),
        "/gen_204": (204, "text/plain", ""),
        "/hotspot-detect.html": (200, "text/html",
                                 "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>"),
        "/library/test/success.html": (200, "text/html",
                                       "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>"),
        "/connecttest.txt": (200, "text/plain", "Microsoft Connect Test"),
        "/ncsi.txt": (200, "text/plain", "Microsoft NCSI"),
        "/success.txt": (200, "text/plain", "success\n"),
        "/canonical.html": (200, "text/html", '<meta http-equiv="refresh" '
                            'content="0;url=https://support.mozilla.org/kb/captive-portal"/>'),
    }

    def probe(path: str) -> bottle.HTTPResponse:
        if has_access():
            status, ctype, body = online_answers[path]
            return bottle.HTTPResponse(body, status, {"Content-Type": ctype, "Cache-Control": "no-store"})
        return _to_portal()

    def _to_portal() -> bottle.HTTPResponse:
        return bottle.HTTPResponse("", 302, {"Location": portal_url(), "Cache-Control": "no-store"})

    for path in online_answers:
        app.route(path, ["GET", "HEAD"], lambda path=path: probe(path))

    # The splash page is what every captured device asks for first, often all at once: it
    # is answered from memory (it never changes while the service runs).
    splash_page = (STATIC_DIR / "index.html").read_bytes()

    @app.get("/")
    def splash():
        return bottle.HTTPResponse(splash_page, 200, {"Content-Type": "text/html; charset=UTF-8",
                                                      "Cache-Control": "no-store"})

    @app.get("/static/<path:path>")
    def static(path: str):
        return bottle.static_file(path, root=str(STATIC_DIR))

    # Any other URL: an unpaid client's HTTP to some outside host, redirected here by the
    # firewall. Send it to the splash page (the probes above cover the OS checks).
    @app.route("/<path:path>", ["GET", "HEAD"])
    def elsewhere(path: str):
        if bottle.request.path.startswith("/api/"):
            return _json(404, {"error": {"code": "not_found", "message": "no such endpoint"}})
        return _to_portal()


def make_app(manager: ChannelManager, node_id: str, meter: Meter | None = None,
             neighbors: NeighborTable | None = None, info: PortalInfo | None = None) -> bottle.Bottle:
    app = bottle.Bottle()
    app.config["catchall"] = False  # errors are answered by api_route, never as HTML
    install_channel_api(app, manager, node_id, meter or Meter(manager, gate=None), neighbors or NeighborTable(),
                        info or PortalInfo())

    @app.error(404)
    def not_found(_err):
        bottle.response.content_type = "application/json"
        return json.dumps({"error": {"code": "not_found", "message": "no such endpoint"}})

    @app.error(405)
    def bad_method(_err):
        bottle.response.content_type = "application/json"
        return json.dumps({"error": {"code": "method_not_allowed", "message": "method not allowed"}})

    return app
