"""The payer's HTTP client for a BitMesh portal (stdlib urllib)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request

from bitmesh.errors import BitMeshError


class PortalError(BitMeshError):
    """The portal refused a request; `code` is the portal's error code."""


class PortalClient:
    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())["error"]
            except (ValueError, KeyError, TypeError):
                raise PortalError(f"HTTP {e.code} from portal", code="portal_error", http_status=e.code) from None
            code = err.get("code", "portal_error")
            raise PortalError(err.get("message", ""), code=code, http_status=e.code) from None
        except http.client.HTTPException as e:  # e.g. IncompleteRead: the router went away mid-answer
            raise PortalError(f"answer cut off: {e!r}", code="portal_answer_cut", http_status=502) from None
        # A router killed while answering can leave a 200 with an empty or partial body: a
        # transport failure (retry; a payment's outcome is then read back), never a crash.
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise PortalError("answer cut off or not a JSON object", code="portal_answer_cut", http_status=502)
        return answer

    def offer(self) -> dict:
        return self._call("GET", "/api/offer")

    def open_channel(self, client_pubkey: bytes, deposit: int, refund_address: str,
                     tariff: dict | None = None) -> dict:
        """`tariff`: the offer's prices this payer accepts (refused with price_changed if no longer current)."""
        body = {"client_pubkey": client_pubkey.hex(), "deposit": deposit, "refund_address": refund_address}
        if tariff is not None:
            body["tariff"] = tariff
        return self._call("POST", "/api/channels", body)

    def channel(self, channel_id: str) -> dict:
        return self._call("GET", f"/api/channels/{channel_id}")

    def fund(self, channel_id: str, raw_tx: bytes | None = None, txid: str | None = None,
             vout: int | None = None) -> dict:
        body: dict = {}
        if raw_tx is not None:
            body["tx"] = raw_tx.hex()
        if txid is not None:
            body["txid"] = txid
        if vout is not None:
            body["vout"] = vout
        return self._call("POST", f"/api/channels/{channel_id}/funding", body)

    def pay(self, channel_id: str, message: dict) -> dict:
        return self._call("POST", f"/api/channels/{channel_id}/payments", message)

    def session(self, channel_id: str | None = None, proof: str | None = None) -> dict:
        """A channel's session as the router meters it, proven by the client key's signature
        (bitmesh.channel.wire.sign_proof); without them, the public state of the caller's device."""
        if channel_id is None and proof is None:
            return self._call("GET", "/api/session")
        query = urllib.parse.urlencode({"channel_id": channel_id or "", "proof": proof or ""})
        return self._call("GET", f"/api/session?{query}")

    def close(self, channel_id: str, proof: str | None = None) -> dict:
        """Settle the channel now; `proof`: the client key's signature (sign_proof(key, "close", id))."""
        return self._call("POST", f"/api/channels/{channel_id}/close", {} if proof is None else {"proof": proof})
