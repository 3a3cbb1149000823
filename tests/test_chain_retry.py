"""Retry with back-off, and what the backends treat as transient (no node needed)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from bitmesh.chain.core_rpc import CoreRpcBackend, RpcError
from bitmesh.chain.retry import Retry, TransientError, describe, is_transient, redact_url
from bitmesh.errors import ChainError, ChainUnavailable


class Sleeps(list):
    def __call__(self, delay: float) -> None:
        self.append(delay)


def failing(times: int, exc: BaseException, result: object = "ok"):
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc
        return result

    fn.calls = calls
    return fn


def test_delays_grow_exponentially_up_to_the_cap():
    assert Retry(attempts=6, base_delay=0.5, max_delay=3.0).delays() == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert Retry(attempts=4, base_delay=1.0, factor=3.0, max_delay=100).delays() == [1.0, 3.0, 9.0]
    assert Retry(attempts=1).delays() == []


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"base_delay": -1}, {"factor": 0.5}])
def test_nonsense_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        Retry(**kwargs)


def test_transient_failures_are_retried_until_success():
    sleeps = Sleeps()
    fn = failing(2, ConnectionRefusedError(111, "Connection refused"), result=42)
    assert Retry(attempts=5, base_delay=0.1, sleep=sleeps).call(fn, "test") == 42
    assert fn.calls["n"] == 3
    assert sleeps == [0.1, 0.2]


def test_gives_up_with_chain_unavailable_after_all_attempts(caplog: pytest.LogCaptureFixture):
    sleeps = Sleeps()
    fn = failing(99, TimeoutError("timed out"))
    with caplog.at_level(logging.WARNING), pytest.raises(ChainUnavailable) as err:
        Retry(attempts=4, base_delay=0.25, max_delay=0.6, sleep=sleeps).call(fn, "tip height")
    assert fn.calls["n"] == 4
    assert sleeps == [0.25, 0.5, 0.6]
    assert err.value.code == "chain_unavailable" and err.value.http_status == 503
    assert "tip height" in str(err.value) and "4 attempts" in str(err.value)
    assert isinstance(err.value.__cause__, TimeoutError)
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 3


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad"), urllib.error.HTTPError("http://x/", 400, "Bad Request", None, None),
     RpcError("getblock", -5, "Block not found"), ChainError("final")],
)  # fmt: skip
def test_final_answers_are_not_retried(exc):
    sleeps = Sleeps()
    fn = failing(1, exc)
    with pytest.raises(type(exc)):
        Retry(attempts=5, sleep=sleeps).call(fn, "x")
    assert fn.calls["n"] == 1 and sleeps == []


def _http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://u:p@h/", code, "x", None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(), True),
        (ConnectionResetError(), True),
        (http.client.RemoteDisconnected("closed"), True),
        (http.client.IncompleteRead(b""), True),
        (TimeoutError(), True),
        (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), True),
        (urllib.error.URLError("unknown url type: ftp"), False),
        (TransientError("warming up"), True),
        (_http_error(500), True),
        (_http_error(503), True),
        (_http_error(429), True),
        (_http_error(400), False),
        (_http_error(401), False),
        (_http_error(404), False),
        (ValueError(), False),
    ],
)
def test_what_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_descriptions_and_redacted_urls_carry_no_credentials():
    assert describe(_http_error(503)) == "HTTP 503"
    assert "secret" not in describe(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")))
    assert redact_url("http://user:secret@127.0.0.1:8332/wallet") == "http://127.0.0.1:8332/wallet"
    assert redact_url("https://[::1]:3000/api?key=secret") == "https://[::1]:3000/api"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_core_backend_never_logs_its_password(caplog: pytest.LogCaptureFixture):
    sleeps = Sleeps()
    chain = CoreRpcBackend(f"http://alice:s3cret-pw@127.0.0.1:{_closed_port()}/",
                           retry=Retry(attempts=3, base_delay=0.01, sleep=sleeps))  # fmt: skip
    with caplog.at_level(logging.DEBUG), pytest.raises(ChainUnavailable) as err:
        chain.tip_height()
    assert sleeps == [0.01, 0.02]
    assert "s3cret-pw" not in caplog.text and "s3cret-pw" not in str(err.value)
    assert "alice" not in caplog.text
    assert "127.0.0.1" in caplog.text  # the endpoint is named, without credentials


# --- how the Core backend reads HTTP answers (Core sends RPC errors with HTTP 404/500) --------


class ScriptedRpc(BaseHTTPRequestHandler):
    """Answers each POST with the next (status, body) of `script`; records auth headers."""

    script: list[tuple[int, str]] = []
    auth: list[str | None] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.auth.append(self.headers.get("Authorization"))
        status, body = self.script.pop(0)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, type[ScriptedRpc]]]:
    handler = type("Handler", (ScriptedRpc,), {"script": [], "auth": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://u:pw@127.0.0.1:{server.server_address[1]}/", handler
    server.shutdown()
    server.server_close()
    thread.join()


def _rpc_answer(result=None, error=None) -> str:
    return json.dumps({"result": result, "error": error, "id": 1})


def test_core_rpc_error_in_http_500_is_a_final_answer(scripted):
    url, handler = scripted
    handler.script += [(500, _rpc_answer(error={"code": -8, "message": "Block height out of range"}))]
    sleeps = Sleeps()
    with pytest.raises(RpcError) as err:
        CoreRpcBackend(url, retry=Retry(sleep=sleeps)).call("getblockhash", 10**6)
    assert err.value.rpc_code == -8 and sleeps == []
    assert handler.auth == ["Basic dTpwdw=="]  # u:pw from the URL


def test_core_warm_up_and_overload_are_retried(scripted):
    url, handler = scripted
    handler.script += [
        (500, _rpc_answer(error={"code": -28, "message": "Loading block index..."})),
        (503, "Work queue depth exceeded"),
        (200, _rpc_answer(result=812_345)),
    ]
    sleeps = Sleeps()
    assert CoreRpcBackend(url, retry=Retry(base_delay=0.1, sleep=sleeps)).tip_height() == 812_345
    assert sleeps == [0.1, 0.2]


def test_core_bad_credentials_are_a_final_answer(scripted):
    url, handler = scripted
    handler.script += [(401, "")]
    with pytest.raises(ChainError, match="credentials") as err:
        CoreRpcBackend(url, retry=Retry(sleep=Sleeps())).tip_height()
    assert not isinstance(err.value, ChainUnavailable)
