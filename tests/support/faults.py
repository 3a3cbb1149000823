"""Faults a router meets, put between the service and the real components it talks to."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bitcoin.core import CTransaction

from tests.support.blocks import mine_block_with


class StallingProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server (e.g. the bcoin node's RPC). While
    `stalled`, it accepts connections and never answers them: a backend that hangs, as a node
    that is overloaded or a link that drops packets does."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.stalled = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="stalling-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.stalled:
                self._held.append(conn)  # read nothing, answer nothing
                continue
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=30)
        except OSError:
            conn.close()
            return

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)

    def release(self) -> None:
        """Answer again: held connections are reset (the client retries), new ones forwarded."""
        self.stalled = False
        for conn in self._held:
            conn.close()
        self._held.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for conn in self._held:
            conn.close()


class LyingPortal:
    """An HTTP proxy on 127.0.0.1 in front of a real portal whose JSON answers it rewrites: a
    router that lies to its payers (about its tip, the prepay step, what is owed). `lie(path,
    fn)` makes every 200 answer to GET `path` pass through `fn(answer) -> answer`; everything
    else (the splash page, the wallet's files, errors) goes through byte for byte."""

    def __init__(self, target_url: str):
        self.target = target_url.rstrip("/")
        self.lies: dict[str, Callable[[dict], dict]] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._relay()

            def do_POST(self) -> None:
                self._relay(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def _relay(self, body: bytes | None = None) -> None:
                req = urllib.request.Request(proxy.target + self.path, data=body, method=self.command)
                if self.headers.get("Content-Type"):
                    req.add_header("Content-Type", self.headers["Content-Type"])
                try:
                    with _DIRECT.open(req, timeout=30) as resp:
                        status, headers, data = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as e:
                    status, headers, data = e.code, e.headers, e.read()
                lie = proxy.lies.get(self.path.split("?")[0]) if self.command == "GET" and status == 200 else None
                if lie is not None:
                    data = json.dumps(lie(json.loads(data))).encode()
                self.send_response(status)
                for name in ("Content-Type", "Cache-Control", "Location", "Content-Disposition"):
                    if headers.get(name):
                        self.send_header(name, headers[name])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def lie(self, path: str, fn: Callable[[dict], dict]) -> None:
        self.lies[path] = fn

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a 302 is relayed to the client, not followed
        return None


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)  # no environment proxy


# --- an HTTP proxy that can lie, and miners with a fee floor ---------------------------------

Rule = Callable[[str, str, bytes], "tuple[int, bytes] | None"]  # (method, path, body) -> canned answer


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real chain backend (bcoin's RPC and REST, or
    an Esplora server). Each request goes through `rules` in order; the first that returns
    (status, body) answers in the backend's place, else the request is forwarded as it came.
    `stalled` holds every request unanswered until `release()` (the client times out), as a
    backend that hangs does. Helpers below make the rules the fault tests need."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.rules: list[Rule] = []
        self.stalled = False
        self.requests = 0
        self._release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests += 1
                if proxy.stalled:
                    proxy._release.wait(30)
                    self.close_connection = True
                    return
                answer = None
                for rule in list(proxy.rules):
                    answer = rule(self.command, self.path, body)
                    if answer is not None:
                        break
                if answer is None:
                    answer = proxy._forward(self.command, self.path, body, dict(self.headers))
                status, data = answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if data[:1] in (b"{", b"[") else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/"

    def _forward(self, method: str, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(*self.target, timeout=30)
        try:
            keep = {k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type")}
            conn.request(method, path, body=body if method == "POST" else None, headers=keep)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stall(self) -> None:
        self._release.clear()
        self.stalled = True

    def release(self) -> None:
        self.stalled = False
        self._release.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


def rpc_method(body: bytes) -> tuple[str, list]:
    try:
        call = json.loads(body or b"{}")
    except ValueError:
        return "", []
    return str(call.get("method", "")), list(call.get("params") or [])


def _rpc_answer(body: bytes, result=None, error: dict | None = None) -> tuple[int, bytes]:
    call = json.loads(body)
    return (500 if error else 200), json.dumps({"result": result, "error": error, "id": call.get("id")}).encode()


def fee_estimate_rule(get_sat_vb: Callable[[], float | None]) -> Rule:
    """bcoin/Core RPC `estimatesmartfee` and Esplora `/fee-estimates` answer `get_sat_vb()`
    (None: forwarded): the fee market a test chooses."""

    def rule(method: str, path: str, body: bytes):
        rate = get_sat_vb()
        if rate is None:
            return None
        if method == "GET" and path.rstrip("/").endswith("/fee-estimates"):
            return 200, json.dumps({str(t): rate for t in (1, 2, 3, 6, 144)}).encode()
        name, params = rpc_method(body) if method == "POST" else ("", [])
        if name == "estimatesmartfee":
            return _rpc_answer(body, {"feerate": rate * 1000 / 1e8, "blocks": params[0] if params else 6})
        return None

    return rule


def hide_tx_rule(txids: set[str], rpc_code: int = -1) -> Rule:
    """The backend does not find the transactions in `txids` (a live set the test edits):
    RPC `getrawtransaction` answers error `rpc_code` ("Transaction not found", as bcoin
    does), Esplora answers 404 to `/tx/<txid>/status` (the hex still answers: what a
    load-balanced Esplora with one lagging server does)."""

    def rule(method: str, path: str, body: bytes):
        if method == "GET":
            parts = path.split("/")
            if len(parts) >= 4 and parts[-3] == "tx" and parts[-2] in txids and parts[-1] == "status":
                return 404, b"Transaction not found"
            return None
        name, params = rpc_method(body)
        if name == "getrawtransaction" and params and params[0] in txids:
            return _rpc_answer(body, error={"code": rpc_code, "message": "Transaction not found."})
        return None

    return rule


def spent_elsewhere_rule(outpoints: set[tuple[str, int]]) -> Rule:
    """The backend says these outputs are spent by a transaction it cannot show: bcoin's REST
    `/coin/<txid>/<n>` answers 404 (the Core backend's mempool-aware "unspent?" look-up) and
    Esplora's `/tx/<txid>/outspend/<n>` answers spent by an unknown txid, unconfirmed."""

    def rule(method: str, path: str, body: bytes):
        if method != "GET":
            return None
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "coin" and (parts[1], int(parts[2])) in outpoints:
            return 404, b"Not found."
        if len(parts) == 4 and parts[0] == "tx" and parts[2] == "outspend" and (parts[1], int(parts[3])) in outpoints:
            return 200, json.dumps({"spent": True, "txid": "ee" * 32, "vin": 0,
                                    "status": {"confirmed": False}}).encode()
        return None

    return rule


def mempool_packages(node) -> list[tuple[float, list[str]]]:
    """(ancestor feerate in sat/vB, txids parents first) for each mempool tx, as a miner
    weighs it: a child pulls in its unconfirmed ancestors (CPFP)."""
    pool = node.rpc("getrawmempool", True)
    packages = []
    for txid in pool:
        chain, seen, fee, size = [], set(), 0, 0
        stack = [txid]
        while stack:
            t = stack.pop()
            if t in seen or t not in pool:
                continue
            seen.add(t)
            entry = pool[t]
            fee += round(float(entry["fee"]) * 1e8)
            size += int(entry["size"])
            chain.append(t)
            stack += list(entry.get("depends") or [])
        packages.append((fee / size, list(reversed(chain))))
    return packages


def mine_above(node, min_sat_vb: float) -> list[str]:
    """Mine one block as a miner with a fee floor would during a spike: only the mempool
    packages whose ancestor feerate reaches `min_sat_vb`. Returns the txids it confirmed."""
    chosen: list[str] = []
    for rate, chain in sorted(mempool_packages(node), key=lambda p: -p[0]):
        if rate >= min_sat_vb:
            chosen += [t for t in chain if t not in chosen]
    txs = [CTransaction.deserialize(bytes.fromhex(node.rpc("getrawtransaction", t, 1)["hex"])) for t in chosen]
    mine_block_with(node, txs)
    return chosen
