"""A thin Esplora REST server over a real bcoin node, for tests only.

It answers exactly the paths EsploraBackend uses, shaped as Esplora's API.md documents them,
by translating each request into bcoin RPC calls. Where bcoin's RPC falls short it does what
electrs does with a real index: it finds spenders by looking through the mempool and the
blocks, and it only answers 200 to POST /tx once the node really holds the tx (bcoin's
sendrawtransaction returns the txid even when it refuses it). The node being down gives 503,
as a real Esplora does when its backing daemon is unreachable.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bitcoin.core import CTransaction, b2lx

from bitmesh.chain.core_rpc import CONFIRM_DELAYS
from tests.support.bcoin import BcoinNode, BcoinRpcError

FEE_TARGETS = (2, 3, 4, 5, 6, 10, 20, 25, 144, 504, 1008)
HASH = r"([0-9a-fA-F]{64})"


class HttpAnswer(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(body)
        self.status, self.body = status, body


class EsploraTestServer:
    """`with EsploraTestServer(node) as server: EsploraBackend(server.url)`.

    `with_mediantime=False` leaves `mediantime` out of block objects, as older electrs do."""

    def __init__(self, node: BcoinNode, with_mediantime: bool = True):
        self.node = node
        self.with_mediantime = with_mediantime
        # txid -> raw hex to answer instead of the node's: a backend that lies about a transaction
        self.tx_hex_override: dict[str, str] = {}
        self._routes: list[tuple[str, re.Pattern, Callable[..., Any]]] = [
            ("GET", re.compile(r"/blocks/tip/height"), lambda: str(self.node.rpc("getblockcount"))),
            ("GET", re.compile(r"/blocks/tip/hash"), lambda: self.node.rpc("getbestblockhash")),
            ("GET", re.compile(rf"/block/{HASH}"), self._block),
            ("GET", re.compile(r"/blocks(?:/(\d+))?"), self._blocks),
            ("GET", re.compile(rf"/tx/{HASH}/hex"), self._tx_hex),
            ("GET", re.compile(rf"/tx/{HASH}/status"), self._tx_status),
            ("GET", re.compile(rf"/tx/{HASH}/outspend/(\d+)"), self._outspend),
            ("GET", re.compile(r"/fee-estimates"), self._fee_estimates),
        ]
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> EsploraTestServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="esplora-test", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join()

    def __enter__(self) -> EsploraTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- dispatch ------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(lambda: server._get(self.path))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                self._answer(lambda: server._post(self.path, body))

            def _answer(self, fn: Callable[[], Any]) -> None:
                try:
                    status, result = 200, fn()
                except HttpAnswer as ans:
                    status, result = ans.status, ans.body
                except OSError as exc:  # the node is down or restarting
                    status, result = 503, f"daemon unreachable: {type(exc).__name__}"
                except Exception as exc:  # a bug here must show, not look like a dropped line
                    status, result = 500, f"test server error: {exc!r}"
                is_json = not isinstance(result, str)
                data = (json.dumps(result) if is_json else result).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if is_json else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                # as public Esploras answer: a wallet page of another origin may read it
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        return Handler

    def _get(self, path: str) -> Any:
        for method, pattern, fn in self._routes:
            m = pattern.fullmatch(path)
            if method == "GET" and m:
                return fn(*m.groups())
        raise HttpAnswer(404, "Not found")

    def _post(self, path: str, body: str) -> Any:
        if path != "/tx":
            raise HttpAnswer(404, "Not found")
        return self._broadcast(body.strip())

    # --- blocks --------------------------------------------------------------------------

    def _block(self, block_hash: str) -> dict:
        try:
            header = self.node.rpc("getblockheader", block_hash)
        except BcoinRpcError:
            raise HttpAnswer(404, "Block not found") from None
        block = {
            "id": header["hash"], "height": header["height"], "version": header["version"],
            "timestamp": header["time"], "bits": header["bits"], "nonce": header.get("nonce", 0),
            "merkle_root": header["merkleroot"], "previousblockhash": header.get("previousblockhash"),
        }  # fmt: skip
        if self.with_mediantime:
            block["mediantime"] = header["mediantime"]
        return block

    def _blocks(self, start: str | None) -> list[dict]:
        height = self.node.rpc("getblockcount") if start is None else min(int(start), self.node.rpc("getblockcount"))
        return [self._block(self.node.rpc("getblockhash", h)) for h in range(height, max(height - 10, -1), -1)]

    # --- transactions --------------------------------------------------------------------

    def _verbose_tx(self, txid: str) -> dict:
        try:
            return self.node.rpc("getrawtransaction", txid, True)
        except BcoinRpcError:
            raise HttpAnswer(404, "Transaction not found") from None

    def _tx_hex(self, txid: str) -> str:
        if txid in self.tx_hex_override:
            return self.tx_hex_override[txid]
        return self._verbose_tx(txid)["hex"]

    def _tx_status(self, txid: str) -> dict:
        return self._status(self._verbose_tx(txid))

    def _status(self, tx: dict) -> dict:
        if not tx.get("confirmations"):
            return {"confirmed": False}
        header = self.node.rpc("getblockheader", tx["blockhash"])
        return {"confirmed": True, "block_height": header["height"], "block_hash": header["hash"],
                "block_time": header["time"]}  # fmt: skip

    def _outspend(self, txid: str, vout: str) -> dict:
        index = int(vout)
        # the mempool first: bcoin's gettxout does not see mempool spends of confirmed coins
        for mtxid in self.node.rpc("getrawmempool"):
            found = self._spending_input(self.node.rpc("getrawtransaction", mtxid, True), txid, index)
            if found is not None:
                return {"spent": True, "txid": mtxid, "vin": found, "status": {"confirmed": False}}
        if self.node.rpc("gettxout", txid, index, True) is not None:
            return {"spent": False}
        try:
            tx = self.node.rpc("getrawtransaction", txid, True)
        except BcoinRpcError:
            return {"spent": False}  # what electrs answers for an unknown outpoint
        if index >= len(tx["vout"]) or not tx.get("confirmations"):
            return {"spent": False}
        return self._chain_spender(txid, index, self.node.rpc("getblockheader", tx["blockhash"])["height"])

    def _chain_spender(self, txid: str, index: int, since: int) -> dict:
        # newest first: the spends tests look for are recent
        for height in range(self.node.rpc("getblockcount"), since - 1, -1):
            block = self.node.rpc("getblock", self.node.rpc("getblockhash", height), True, True)
            for tx in block["tx"]:
                found = self._spending_input(tx, txid, index)
                if found is not None:
                    status = {"confirmed": True, "block_height": height, "block_hash": block["hash"],
                              "block_time": block["time"]}  # fmt: skip
                    return {"spent": True, "txid": tx["txid"], "vin": found, "status": status}
        raise HttpAnswer(500, f"{txid}:{index} is spent but no spender was found")

    @staticmethod
    def _spending_input(tx: dict, txid: str, index: int) -> int | None:
        for i, vin in enumerate(tx["vin"]):
            if vin.get("txid") == txid and vin.get("vout") == index:
                return i
        return None

    def _broadcast(self, raw_hex: str) -> str:
        try:
            txid = b2lx(CTransaction.deserialize(bytes.fromhex(raw_hex)).GetTxid())
        except Exception:
            raise HttpAnswer(400, _rpc_error(-22, "TX decode failed")) from None
        try:
            self.node.rpc("sendrawtransaction", raw_hex)
        except BcoinRpcError as exc:
            raise HttpAnswer(400, _rpc_error(exc.code, exc.message)) from None
        for delay in (0, *CONFIRM_DELAYS):
            time.sleep(delay)
            if self.node.mempool_has(txid) or self._confirmed(txid):
                return txid
        reason = self.node.reject_reason(txid) or "rejected"
        if "already" in reason:  # bcoin says so of a tx sitting in its orphan pool
            reason = "bad-txns-inputs-missingorspent"
        raise HttpAnswer(400, _rpc_error(-26, reason))

    def _confirmed(self, txid: str) -> bool:
        try:
            return bool(self.node.rpc("getrawtransaction", txid, True).get("confirmations"))
        except BcoinRpcError:
            return False

    def _fee_estimates(self) -> dict[str, float]:
        out = {}
        for target in FEE_TARGETS:
            try:
                btc_per_kb = self.node.rpc("estimatesmartfee", target).get("fee", -1)
            except BcoinRpcError:  # bcoin estimates at most 25 blocks ahead
                continue
            if btc_per_kb > 0:
                out[str(target)] = btc_per_kb * 100_000
        return out  # {} on regtest, as electrs answers when bitcoind has no estimate


def _rpc_error(code: int, message: str) -> str:
    # the shape electrs gives when bitcoind refuses a broadcast
    return "sendrawtransaction RPC error: " + json.dumps({"code": code, "message": message})
