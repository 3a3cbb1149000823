"""Bitcoin Core JSON-RPC backend (also bcoin's compatible RPC, which the tests run on).

Needs a node with a transaction index (Core: txindex=1; bcoin: --index-tx) so that confirmed
transactions can be looked up by txid. stdlib only: this runs on the router.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request

from bitmesh.chain.base import ChainBackend, OutSpend, TxStatus, Unspent, clamp_feerate
from bitmesh.chain.retry import Retry, TransientError, redact_url
from bitmesh.chain.txutil import is_txid, output_count, raw_txid
from bitmesh.errors import BroadcastRejected, ChainError, ConfigError

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

RPC_IN_WARMUP = -28
RPC_METHOD_NOT_FOUND = -32601
RPC_VERIFY_ALREADY_IN_CHAIN = -27
# How long to look for a broadcast tx in the node: bcoin answers sendrawtransaction before its
# mempool has judged the tx, and answers with the txid even when it refuses it.
CONFIRM_DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
_ALREADY_KNOWN = ("already in block chain", "already in utxo set", "txn-already-in-mempool", "txn-already-known")


class RpcError(ChainError):
    """The node answered with a JSON-RPC error (a final answer, not an outage)."""

    def __init__(self, method: str, rpc_code: int, rpc_message: str):
        super().__init__(f"{method}: {rpc_message} (rpc code {rpc_code})")
        self.method, self.rpc_code, self.rpc_message = method, rpc_code, rpc_message


class CoreRpcBackend(ChainBackend):
    """`url` may carry the credentials (http://user:pass@host:port/); they are never logged."""

    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        retry: Retry | None = None,
        confirm_delays: tuple[float, ...] = CONFIRM_DELAYS,
    ):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"chain RPC URL must be http(s)://host:port/, got {redact_url(url)!r}")
        user = user if user is not None else urllib.parse.unquote(parts.username or "")
        password = password if password is not None else urllib.parse.unquote(parts.password or "")
        self.endpoint = redact_url(url)  # safe to show
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user or password else None
        self.timeout = timeout
        self.retry = retry or Retry()
        self.confirm_delays = confirm_delays
        self._ids = itertools.count(1)
        self._flavour: str | None = None  # "core" or "bcoin", learnt on first need

    # --- transport -----------------------------------------------------------------------

    def call(self, method: str, *params: Any) -> Any:
        """One JSON-RPC call with retries; RpcError for the node's refusals."""
        return self.retry.call(lambda: self._call_once(method, params), f"core rpc {method} at {self.endpoint}")

    def _call_once(self, method: str, params: tuple) -> Any:
        body = json.dumps({"jsonrpc": "1.0", "id": next(self._ids), "method": method, "params": list(params)})
        headers = {"Content-Type": "application/json"}
        if self._auth:
            headers["Authorization"] = self._auth
        req = urllib.request.Request(self.endpoint, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            # Core sends RPC errors with HTTP 404/500 and a JSON body: that is an answer
            answer = _json_error_body(exc)
            if answer is None:
                if exc.code in (401, 403):
                    msg = f"chain RPC at {self.endpoint} refused the credentials (HTTP {exc.code})"
                    raise ChainError(msg) from None
                raise
        except json.JSONDecodeError as exc:
            raise ChainError(f"chain RPC at {self.endpoint} sent a non-JSON answer") from exc
        err = answer.get("error")
        if err:
            code, message = int(err.get("code", 0)), str(err.get("message", err))
            if code == RPC_IN_WARMUP:
                raise TransientError(f"node warming up: {message}")
            raise RpcError(method, code, message)
        return answer.get("result")

    # --- ChainBackend --------------------------------------------------------------------

    def tip_height(self) -> int:
        return int(self.call("getblockcount"))

    def median_time_past(self) -> int:
        info = self.call("getblockchaininfo")
        if "mediantime" in info:
            return int(info["mediantime"])
        return int(self.call("getblockheader", info["bestblockhash"])["mediantime"])

    def get_tx(self, txid: str) -> TxStatus | None:
        _check_txid(txid)
        try:
            res = self.call("getrawtransaction", txid, True)
        except RpcError as exc:
            if "-txindex" in exc.rpc_message:
                # Core without txindex cannot tell "unknown" from "confirmed": refuse to guess
                raise ConfigError("the Bitcoin Core node needs txindex=1 for BitMesh") from exc
            if exc.rpc_code in (-5, -1) or "not found" in exc.rpc_message.lower():
                return None
            raise
        confirmations = int(res.get("confirmations") or 0)
        height = None
        if confirmations > 0 and res.get("blockhash"):
            height = int(self.call("getblockheader", res["blockhash"])["height"])
        return TxStatus(txid=txid, raw=bytes.fromhex(res["hex"]), confirmations=confirmations, block_height=height)

    def get_outspend(self, txid: str, vout: int) -> OutSpend:
        _check_txid(txid)
        if self._unspent(txid, vout):
            return OutSpend(spent=False)
        spender = self._mempool_spender(txid, vout)
        if spender is not None:
            return OutSpend(spent=True, spending_txid=spender, confirmations=0)
        tx = self.get_tx(txid)
        if tx is None or vout >= output_count(tx.raw):
            return OutSpend(spent=False)  # no such output (what Esplora answers too)
        # Core-style RPC has no index from an outpoint to its spender. Spent in a block (a
        # confirmed spend) when the chain's own UTXO set, mempool left out, lacks a confirmed
        # output; else the spend is in the mempool (nodes without gettxspendingprevout, bcoin)
        if tx.confirmations > 0 and self.call("gettxout", txid, vout, False) is None:
            return OutSpend(spent=True, confirmations=1)  # at least 1
        return OutSpend(spent=True)

    def _unspent(self, txid: str, vout: int) -> bool:
        if self._is_bcoin():
            # bcoin's gettxout misses mempool spends of confirmed coins; its REST /coin sees them
            return self._rest_get(f"coin/{txid}/{int(vout)}") is not None
        return self.call("gettxout", txid, vout, True) is not None

    def _is_bcoin(self) -> bool:
        if self._flavour is None:
            agent = str((self.call("getnetworkinfo") or {}).get("subversion", ""))
            self._flavour = "bcoin" if "bcoin" in agent.lower() else "core"
        return self._flavour == "bcoin"

    def _rest_get(self, path: str) -> Any:
        """GET on the node's REST side (bcoin serves it beside the RPC); None for 404."""
        return self.retry.call(lambda: self._rest_get_once(path), f"node rest {path.split('/')[0]} at {self.endpoint}")

    def _rest_get_once(self, path: str) -> Any:
        req = urllib.request.Request(urllib.parse.urljoin(self.endpoint, path))
        if self._auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                exc.close()
                return None
            raise

    def _mempool_spender(self, txid: str, vout: int) -> str | None:
        """gettxspendingprevout (Core >= 24) knows mempool spenders; older nodes and bcoin lack it."""
        try:
            res = self.call("gettxspendingprevout", [{"txid": txid, "vout": vout}])
        except RpcError as exc:
            if exc.rpc_code == RPC_METHOD_NOT_FOUND or "not found" in exc.rpc_message.lower():
                return None
            raise
        return (res or [{}])[0].get("spendingtxid")

    def address_unspent(self, address: str) -> list[Unspent]:
        """bcoin (run with --index-address): its REST `GET /coin/address/<addr>`, mempool coins
        included and mempool spends left out. Core: `scantxoutset` over the confirmed UTXO set
        (Core keeps no address index: a scan takes seconds to minutes on mainnet; mempool coins
        are not seen), mempool spends left out through `gettxspendingprevout` (Core >= 24)."""
        if self._is_bcoin():
            coins = self._rest_get(f"coin/address/{urllib.parse.quote(address, safe='')}") or []
            return [Unspent(str(coin["hash"]), int(coin["index"]), int(coin["value"]),
                            None if int(coin["height"]) < 0 else int(coin["height"])) for coin in coins]
        res = self.call("scantxoutset", "start", [f"addr({address})"]) or {}
        found = [Unspent(str(u["txid"]), int(u["vout"]), btc_to_sat(u["amount"]), int(u["height"]))
                 for u in res.get("unspents", [])]
        if not found:
            return []
        try:
            spends = self.call("gettxspendingprevout", [{"txid": u.txid, "vout": u.vout} for u in found]) or []
        except RpcError as exc:
            if exc.rpc_code != RPC_METHOD_NOT_FOUND:
                raise
            return found  # an older Core: a mempool spend is not seen
        spent = {(s["txid"], int(s["vout"])) for s in spends if s.get("spendingtxid")}
        return [u for u in found if (u.txid, u.vout) not in spent]

    def broadcast(self, raw: bytes) -> str:
        txid = raw_txid(raw)
        try:
            answer = self.call("sendrawtransaction", raw.hex())
        except RpcError as exc:
            if exc.rpc_code == RPC_VERIFY_ALREADY_IN_CHAIN:
                return txid
            if not any(s in exc.rpc_message.lower() for s in _ALREADY_KNOWN):
                raise BroadcastRejected(f"node refused {txid}: {exc.rpc_message}") from exc
            answer = txid
        if answer != txid:
            log.warning("node answered txid %s for broadcast of %s", answer, txid)
        if self._held(txid):
            return txid
        raise BroadcastRejected(f"node did not take {txid}: not in its mempool or chain after broadcast")

    def _held(self, txid: str) -> bool:
        """Is the tx in the mempool or the chain? Polled briefly: bcoin judges it asynchronously."""
        for delay in (0.0, *self.confirm_delays):
            time.sleep(delay)  # not retry.sleep: this is a wait for the node, not a back-off
            try:
                self.call("getmempoolentry", txid)
                return True
            except RpcError:
                pass
            status = self.get_tx(txid)
            if status is not None and status.confirmations > 0:
                return True
        return False

    def estimate_feerate(self, target_blocks: int = 6) -> float:
        try:
            return self.fee_estimate(target_blocks)
        except ChainError as exc:
            log.warning("fee estimate unavailable (%s); using the fallback", exc.code)
            return clamp_feerate(None)

    def fee_estimate(self, target_blocks: int = 6) -> float:
        res = self.call("estimatesmartfee", target_blocks) or {}
        # Core: {"feerate": BTC/kvB} or {"errors": [...]}; bcoin: {"fee": BTC/kB or -1}
        btc_per_kvb = res.get("feerate", res.get("fee"))
        return clamp_feerate(btc_per_kvb_to_sat_vb(btc_per_kvb))


def btc_to_sat(value: float | int | str) -> int:
    """A JSON BTC amount (up to 8 decimals) to satoshis, exactly, without the decimal module (not
    in python3-light): the float nearest to such an amount prints back as it with 8 decimals for
    any amount below 2^53 sat."""
    text = (value if isinstance(value, str) else format(value, ".8f")).strip()
    whole, _, frac = text.partition(".")
    digits = whole.removeprefix("-")
    well_formed = all(part.isdigit() or not part for part in (digits, frac)) and (digits or frac)
    if not well_formed or len(frac) > 8:
        raise ChainError(f"not a BTC amount with at most 8 decimals: {value!r}")
    sats = int(digits or "0") * 100_000_000 + int(frac.ljust(8, "0"))
    return -sats if whole.startswith("-") else sats


def btc_per_kvb_to_sat_vb(value: float | int | None) -> float | None:
    if value is None or value <= 0:
        return None
    return float(value) * 100_000_000 / 1000


def _json_error_body(exc: urllib.error.HTTPError) -> dict | None:
    try:
        body = json.loads(exc.read())
    except (ValueError, OSError):
        return None
    finally:
        exc.close()
    return body if isinstance(body, dict) and body.get("error") else None


def _check_txid(txid: str) -> None:
    if not is_txid(txid):
        raise ValueError(f"not a txid: {txid!r}")
