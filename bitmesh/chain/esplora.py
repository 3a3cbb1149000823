"""Esplora REST backend: the API Blockstream's electrs and mempool.space serve.

Routers cannot run a node, so this is the common case. Paths used (Esplora API.md):
GET /blocks/tip/height, /blocks/tip/hash, /block/:hash, /blocks/:start_height,
/tx/:txid/hex, /tx/:txid/status, /tx/:txid/outspend/:vout, /fee-estimates,
/address/:address/utxo; POST /tx.
stdlib only.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request

from bitmesh.chain.base import ChainBackend, OutSpend, TxStatus, Unspent, clamp_feerate
from bitmesh.chain.retry import Retry, redact_url
from bitmesh.chain.txutil import is_txid, raw_txid
from bitmesh.errors import BroadcastRejected, ChainError, ConfigError

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

# Error texts (electrs relays bitcoind's) meaning the tx is already there: a success for us
_ALREADY_KNOWN = ("already in block chain", "already in utxo set", "txn-already-in-mempool", "txn-already-known")
MTP_BLOCKS = 11  # BIP113: median of the last 11 block timestamps


class EsploraBackend(ChainBackend):
    def __init__(self, base_url: str, timeout: float = 10.0, retry: Retry | None = None):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"Esplora URL must be http(s)://host[:port]/path, got {redact_url(base_url)!r}")
        self.base_url = base_url.rstrip("/")
        self.endpoint = redact_url(self.base_url)
        self.timeout = timeout
        self.retry = retry or Retry()

    # --- transport -----------------------------------------------------------------------

    def _request(self, path: str, body: str | None = None, missing_ok: bool = False) -> str | None:
        """GET (or POST when `body` is given) with retries. 404 -> None when `missing_ok`;
        other 4xx -> ChainError (or BroadcastRejected for POST /tx, handled by the caller)."""
        what = f"esplora {path.split('/')[1]} at {self.endpoint}"
        return self.retry.call(lambda: self._request_once(path, body, missing_ok), what)

    def _request_once(self, path: str, body: str | None, missing_ok: bool) -> str | None:
        data = body.encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method="POST" if data is not None else "GET")
        if data is not None:
            req.add_header("Content-Type", "text/plain")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code == 429:
                raise  # transient: Retry decides
            text = _read_error(exc)
            if exc.code == 404 and missing_ok:
                return None
            raise EsploraHttpError(path, exc.code, text) from None

    def _json(self, path: str, missing_ok: bool = False) -> Any:
        text = self._request(path, missing_ok=missing_ok)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise ChainError(f"Esplora {path.split('/')[1]} sent a non-JSON answer") from None

    # --- ChainBackend --------------------------------------------------------------------

    def tip_height(self) -> int:
        return int(self._request("/blocks/tip/height"))

    def median_time_past(self) -> int:
        tip_hash = self._request("/blocks/tip/hash").strip()
        block = self._json(f"/block/{_hex(tip_hash)}")
        if block.get("mediantime") is not None:  # mempool.space and newer electrs give it
            return int(block["mediantime"])
        return self._mtp_from_timestamps(int(block["height"]))

    def _mtp_from_timestamps(self, height: int) -> int:
        """Older electrs omit mediantime: take the median of the last 11 timestamps ourselves."""
        times: list[int] = []
        start = height
        while len(times) < MTP_BLOCKS and start >= 0:
            page = self._json(f"/blocks/{start}")  # up to 10 blocks, newest first
            if not page:
                break
            times += [int(b["timestamp"]) for b in page]
            start = int(page[-1]["height"]) - 1
        times = sorted(times[:MTP_BLOCKS])
        return times[len(times) // 2]

    def get_tx(self, txid: str) -> TxStatus | None:
        raw_hex = self._request(f"/tx/{_hex(txid)}/hex", missing_ok=True)
        if raw_hex is None:
            return None
        status = self._json(f"/tx/{txid}/status", missing_ok=True)
        if status is None:  # dropped from the mempool between the two requests
            return None
        confirmations, height = self._depth(status)
        return TxStatus(txid=txid, raw=bytes.fromhex(raw_hex.strip()), confirmations=confirmations, block_height=height)

    def get_outspend(self, txid: str, vout: int) -> OutSpend:
        res = self._json(f"/tx/{_hex(txid)}/outspend/{int(vout)}")
        if not res.get("spent"):
            return OutSpend(spent=False)
        confirmations = self._depth(res["status"])[0] if res.get("status") else 0
        return OutSpend(spent=True, spending_txid=res.get("txid"), confirmations=confirmations)

    def _depth(self, status: dict) -> tuple[int, int | None]:
        """(confirmations, block height) from an Esplora status object."""
        if not status.get("confirmed"):
            return 0, None
        height = int(status["block_height"])
        # the tip may come from another server behind a load balancer: never less than 1
        return max(1, self.tip_height() - height + 1), height

    def broadcast(self, raw: bytes) -> str:
        txid = raw_txid(raw)
        try:
            answer = (self._request("/tx", body=raw.hex()) or "").strip()
        except EsploraHttpError as exc:
            if any(s in exc.text.lower() for s in _ALREADY_KNOWN):
                return txid
            if exc.status == 400:
                raise BroadcastRejected(f"node refused {txid}: {exc.text}") from None
            raise
        if answer != txid:
            raise BroadcastRejected(f"Esplora answered {answer[:80]!r} to the broadcast of {txid}")
        return txid

    def address_unspent(self, address: str) -> list[Unspent]:
        """GET /address/:address/utxo: confirmed and mempool outputs, mempool spends left out
        (electrs indexes the mempool too)."""
        utxos = self._json(f"/address/{urllib.parse.quote(address, safe='')}/utxo") or []
        out = []
        for u in utxos:
            status = u.get("status") or {}
            height = int(status["block_height"]) if status.get("confirmed") else None
            out.append(Unspent(_hex(str(u["txid"])), int(u["vout"]), int(u["value"]), height))
        return out

    def estimate_feerate(self, target_blocks: int = 6) -> float:
        try:
            return self.fee_estimate(target_blocks)
        except ChainError as exc:
            log.warning("fee estimate unavailable (%s); using the fallback", exc.code)
            return clamp_feerate(None)

    def fee_estimate(self, target_blocks: int = 6) -> float:
        estimates = self._json("/fee-estimates") or {}
        return clamp_feerate(pick_estimate(estimates, target_blocks))


def pick_estimate(estimates: dict[str, float], target_blocks: int) -> float | None:
    """The estimate for the largest target not above `target_blocks` (never a slower one),
    else the fastest target there is; None when the server has no estimates (regtest)."""
    targets = sorted((int(k), float(v)) for k, v in estimates.items())
    if not targets:
        return None
    within = [rate for target, rate in targets if target <= target_blocks]
    return within[-1] if within else targets[0][1]


class EsploraHttpError(ChainError):
    """Esplora answered 4xx: a final answer, not an outage."""

    def __init__(self, path: str, status: int, text: str):
        super().__init__(f"Esplora {path.split('/')[1]}: HTTP {status}: {text[:200]}")
        self.status, self.text = status, text


def _read_error(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read().decode(errors="replace").strip()
    except OSError:
        return ""
    finally:
        exc.close()


def _hex(value: str) -> str:
    if not is_txid(value):  # block hashes have the same shape
        raise ValueError(f"not a 32-byte hex hash: {value!r}")
    return value
