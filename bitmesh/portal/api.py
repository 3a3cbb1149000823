"""The channel API over HTTP+JSON (bottle). docs/protocol.md is its specification.

Thin transport: parse with bitmesh.channel.wire, act through the ChannelManager, answer
JSON. Every refusal is `{"error": {"code", "message"}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bottle

from bitmesh.channel import server as rules
from bitmesh.channel import wire
from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.state import Channel, Phase
from bitmesh.errors import ChannelError, RequestError, answer
from bitmesh.meter import Meter
from bitmesh.portal.clones import start_clone_watch
from bitmesh.portal.httpserver import FixedAnswer, TokenBuckets, is_loopback
from bitmesh.portal.neighbors import NeighborTable

STATIC_DIR = Path(__file__).with_name("static")


def _json(status: int, payload: dict) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        body=json.dumps(payload, separators=(",", ":")),
        status=status,
        headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


# JSON nesting a request may have: the deepest real message is 2 levels; Python's parser
# recurses per level and would end in a RecursionError (a 500) on a 64 KiB "[[[[...".
MAX_JSON_DEPTH = 16
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in `body` (strings skipped), without parsing it."""
    depth = deepest = 0
    for ch in _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += 1 if ch in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def read_json_body() -> dict:
    """The request's JSON object. The portal's server (httpserver) has framed and capped the
    body already; this stays safe under any WSGI server: a malformed length is a 400, an
    oversized or chunked body is refused before anything is read (bottle would spool it)."""
    env = bottle.request.environ
    if env.get("HTTP_TRANSFER_ENCODING"):
        raise RequestError("send the body with a Content-Length", code="transfer_encoding_unsupported")
    raw = (env.get("CONTENT_LENGTH") or "0").strip()
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise RequestError("Content-Length must be one decimal number", code="content_length_invalid")
    length = int(raw)
    if length > wire.MAX_BODY_BYTES:
        raise RequestError(f"body larger than {wire.MAX_BODY_BYTES} bytes", code="body_too_large", http_status=413)
    body = env["wsgi.input"].read(length) if length else b""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise RequestError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep")
    return wire.parse_json(body)


class RateLimited(RequestError):
    """Too many requests of this kind from this device: retry after `retry_after` seconds."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, code: str, retry_after: int):
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def to_json(self) -> dict:
        out = super().to_json()
        out["error"]["retry_after"] = self.retry_after
        return out


@dataclass(frozen=True)
class OpenLimit:
    """Channel opens per device (its MAC; its IP where the router sees no MAC): `burst` at
    once, then one per `seconds`. Each open reserves a key index on flash and keeps an unfunded
    channel in memory until its expiry, so an unpaid device must not make them without end."""

    burst: int = 10
    seconds: float = 30.0
    exempt_loopback: bool = True  # the router itself (no LAN packet has a loopback source)


def api_route(handler: Callable[..., dict]) -> Callable[..., bottle.HTTPResponse]:
    """Runs a handler; its dict becomes a 200 JSON answer, a BitMeshError a JSON error
    (bitmesh.errors.answer, which the ubus object shares); a rate limit says when to retry."""

    def wrapper(*args, **kwargs):
        status, payload = answer(bottle.request.path, lambda: handler(*args, **kwargs))
        response = _json(status, payload)
        retry = payload.get("error", {}).get("retry_after") if status in (429, 503) else None
        if retry is not None:
            response.set_header("Retry-After", str(retry))
        return response

    wrapper.__name__ = handler.__name__
    return wrapper


@dataclass(frozen=True)
class PortalInfo:
    """What the splash page and the captive API tell clients about this hotspot."""

    title: str = "BitMesh Wi-Fi"
    text: str = ""
    url: str | None = None  # the splash page's absolute URL; None = from the request's Host


def _caller_ip() -> str:
    """The caller: the socket's peer as the server set it (WSGI REMOTE_ADDR), never a header (bottle's
    own remote-address helper answers X-Forwarded-For's first entry: whatever the client wrote)."""
    addr = bottle.request.environ.get("REMOTE_ADDR") or ""
    return addr[7:] if addr.startswith("::ffff:") else addr  # IPv4-mapped on a dual-stack socket


def public_session(session_json: dict) -> dict:
    """What anybody at a device's address may know of its session: whether it has access and for
    how long (as RFC 8908 tells it); the channel, money and usage take the channel's proof."""
    return {k: session_json[k] for k in ("state", "bytes_remaining", "seconds_remaining")}


# A device's channel that holds, or is about to hold, its grant in the kernel (keyed by MAC).
DEVICE_PHASES = (Phase.FUNDING_UNCONFIRMED, Phase.OPEN)


def install_channel_api(app: bottle.Bottle, manager: ChannelManager, node_id: str, meter: Meter,
                        neighbors: NeighborTable, info: PortalInfo, open_limit: OpenLimit = OpenLimit()) -> None:
    network = manager.policy.network
    opens = TokenBuckets(1.0 / open_limit.seconds, open_limit.burst)
    opens_lock = threading.Lock()

    def count_open(mac: str, ip: str) -> None:
        """One open more for this device, or 429 open_rate_limited (nothing created)."""
        if not mac and open_limit.exempt_loopback and is_loopback(ip):
            return
        with opens_lock:
            opens.prune()
            wait = opens.take(mac or ip)
        if wait:
            raise RateLimited(f"too many channel opens from this device: {open_limit.burst} at once, then one "
                              f"per {open_limit.seconds:g} s", code="open_rate_limited", retry_after=int(wait) + 1)
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
                                   "(POST /api/channels/<id>/close with its proof)",
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
        """The caller's device's newest channel: the socket's peer address and the MAC the kernel
        has for it now, both the channel's (its public state only: the rest takes the proof)."""
        ip = _caller_ip()
        mac = neighbors.mac_of(ip)
        mine = [ch for ch in manager.channels() if ch.client_ip == ip and ch.client_mac == mac]
        live = [ch for ch in mine if not ch.phase.final]
        return max(live or mine, key=lambda ch: ch.created_at, default=None)

    def proven_channel(channel_id: str, action: str, proof: object) -> Channel:
        """The channel, once `proof` shows the caller holds its client key (wherever it calls from)."""
        channel = manager.get(channel_id)
        wire.check_proof(channel.client_pubkey, action, channel.id, proof)
        return channel

    # Concurrent use of a paid grant (a MAC+IP copy), shown in the session: only where grants exist.
    clone_watch = start_clone_watch(manager.channels, neighbors.device_of) if meter.metered else None

    @app.get("/api/offer")
    @api_route
    def offer() -> dict:
        policy = manager.policy  # one snapshot: the price and whether it is sold go together
        extra = {
            "tariff": {"sat_per_mb": policy.sat_per_mb, "sat_per_minute": policy.sat_per_minute},
            # false: opens are refused (not_selling) for `closed_reason` (uplink mode: upstream credit)
            "selling": policy.closed_reason is None,
            "closed_reason": policy.closed_reason,
            # false (`bitmesh serve --no-firewall`): nothing is measured, owed = paid, all of it settled
            "metered": meter.metered,
            "portal_title": info.title,
            "portal_text": info.text,
            "tip_height": manager.chain_view().tip_height,
        }
        return wire.offer_json(policy, node_id, extra)

    @app.post("/api/channels")
    @api_route
    def open_channel() -> dict:
        req = wire.parse_open(read_json_body(), network)
        rules.check_selling(manager.policy)  # told to anyone first, no open counted (the manager checks again)
        ip = _caller_ip()
        mac = gated_mac(ip)
        with device_lock(mac) if mac else contextlib.nullcontext():
            one_channel_per_device(mac)
            count_open(mac, ip)
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
        manager.get(channel_id)  # unknown channel: 404 before the body is looked at
        proven_channel(channel_id, "close", read_json_body().get("proof"))
        return channel_json(manager.close(channel_id))

    @app.get("/api/session")
    @api_route
    def session() -> dict:
        query = bottle.request.query
        if "channel_id" not in query and "proof" not in query:  # the caller's device: public state only
            return public_session(meter.session(caller_channel()).to_json(manager.policy.prepay_step_sat))
        if not query.get("channel_id"):
            raise RequestError("a proof names its channel: give channel_id", code="field_missing")
        channel = proven_channel(query.get("channel_id"), "session", query.get("proof"))
        answer = meter.session(channel).to_json(manager.policy.prepay_step_sat)
        answer["concurrent_use"] = clone_watch.verdict(channel) if clone_watch else None
        return answer

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
    splash_headers = {"Content-Type": "text/html; charset=UTF-8", "Cache-Control": "no-store"}
    # The portal's server sends it from its I/O thread, with no worker and no bottle on the way
    # (httpserver.FixedAnswer); the route stays for any other WSGI server.
    app.fixed_answers = {"/": FixedAnswer(200, tuple(splash_headers.items()), splash_page)}

    @app.get("/")
    def splash():
        return bottle.HTTPResponse(splash_page, 200, splash_headers)

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
             neighbors: NeighborTable | None = None, info: PortalInfo | None = None,
             open_limit: OpenLimit | None = None) -> bottle.Bottle:
    app = bottle.Bottle()
    app.config["catchall"] = False  # errors are answered by api_route, never as HTML
    install_channel_api(app, manager, node_id, meter or Meter(manager, gate=None), neighbors or NeighborTable(),
                        info or PortalInfo(), open_limit or OpenLimit())

    # bottle's own refusals (no route, wrong method, a path that is not UTF-8 ...) in JSON too
    codes = {400: "request_malformed", 404: "not_found", 405: "method_not_allowed"}

    def error_json(err: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        bottle.response.set_header("Cache-Control", "no-store")
        code = codes.get(err.status_code, f"http_{err.status_code}")
        message = {404: "no such endpoint", 405: "method not allowed"}.get(err.status_code, str(err.body or code))
        return json.dumps({"error": {"code": code, "message": message}})

    app.default_error_handler = error_json
    return app
