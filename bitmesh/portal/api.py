"""The channel API over HTTP+JSON (bottle). docs/protocol.md is its specification.

Thin transport: parse with bitmesh.channel.wire, act through the ChannelManager, answer
JSON. Every refusal is `{"error": {"code", "message"}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import bottle

from bitmesh.channel import wire
from bitmesh.channel.manager import ChannelManager
from bitmesh.errors import BitMeshError, RequestError

log = logging.getLogger(__name__)


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
    """Runs a handler; its dict becomes a 200 JSON answer, a BitMeshError a JSON error."""

    def wrapper(*args, **kwargs):
        try:
            return _json(200, handler(*args, **kwargs))
        except BitMeshError as e:
            return _json(e.http_status, e.to_json())
        except Exception:
            log.exception("unhandled error in %s", bottle.request.path)
            return _json(500, {"error": {"code": "internal_error", "message": "internal error"}})

    wrapper.__name__ = handler.__name__
    return wrapper


def install_channel_api(app: bottle.Bottle, manager: ChannelManager, node_id: str,
                        offer_extra: Callable[[], dict] | None = None) -> None:
    network = manager.policy.network

    @app.get("/api/offer")
    @api_route
    def offer() -> dict:
        return wire.offer_json(manager.policy, node_id, offer_extra() if offer_extra else None)

    @app.post("/api/channels")
    @api_route
    def open_channel() -> dict:
        req = wire.parse_open(read_json_body(), network)
        return wire.channel_json(manager.open_channel(req), network)

    @app.get("/api/channels/<channel_id>")
    @api_route
    def get_channel(channel_id: str) -> dict:
        return wire.channel_json(manager.get(channel_id), network)

    @app.post("/api/channels/<channel_id>/funding")
    @api_route
    def funding(channel_id: str) -> dict:
        manager.get(channel_id)  # unknown channel: 404 before the body is looked at
        req = wire.parse_funding(read_json_body())
        return wire.channel_json(manager.submit_funding(channel_id, req), network)

    @app.post("/api/channels/<channel_id>/payments")
    @api_route
    def payments(channel_id: str) -> dict:
        manager.get(channel_id)
        payment = wire.parse_payment(read_json_body())
        channel = manager.pay(channel_id, payment)
        return {"channel_id": channel.id, "paid": channel.paid, "remaining": channel.deposit - channel.paid}

    @app.post("/api/channels/<channel_id>/close")
    @api_route
    def close(channel_id: str) -> dict:
        return wire.channel_json(manager.close(channel_id), network)


def make_app(manager: ChannelManager, node_id: str) -> bottle.Bottle:
    app = bottle.Bottle()
    app.config["catchall"] = False  # errors are answered by api_route, never as HTML
    install_channel_api(app, manager, node_id)

    @app.error(404)
    def not_found(_err):
        bottle.response.content_type = "application/json"
        return json.dumps({"error": {"code": "not_found", "message": "no such endpoint"}})

    @app.error(405)
    def bad_method(_err):
        bottle.response.content_type = "application/json"
        return json.dumps({"error": {"code": "method_not_allowed", "message": "method not allowed"}})

    return app
