"""The portal's HTTP server (bitmesh/portal/httpserver.py) on malformed input, in-process against
the real application on the regtest node (issue 10, item 7): each of these was a 500 on HEAD's
wsgiref server and bottle (253 of 10,000 fuzzed requests). Now a 4xx JSON error with a stable
code, the connection closed, nothing changed, and the server answers the next request.
The server process under load and attack (threads, memory, timeouts): tests/test_portal_netns.py."""

from __future__ import annotations

import json

import pytest

from tests.support.fuzz import exchange, state_of
from tests.support.hotspot import Hotspot

pytestmark = pytest.mark.regtest

OPEN = b"POST /api/channels HTTP/1.1\r\nHost: 10.77.1.1\r\nContent-Type: application/json\r\n"


def _chunked(*lines: bytes) -> bytes:
    return OPEN + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(lines)


def _length(value: bytes, body: bytes = b"{}") -> bytes:
    return OPEN + b"Content-Length: " + value + b"\r\n\r\n" + body


CASES = {
    # Content-Length that is not one decimal number (HEAD: int() in bottle -> ValueError -> 500)
    "length_abc": (_length(b"abc"), 400, "content_length_invalid"),
    "length_negative": (_length(b"-1"), 400, "content_length_invalid"),
    "length_plus": (_length(b"+2"), 400, "content_length_invalid"),
    "length_two_values": (_length(b"2, 3"), 400, "content_length_invalid"),
    "length_huge": (_length(b"99999999999999999999999"), 400, "content_length_invalid"),
    "length_over_cap": (_length(b"70000"), 413, "body_too_large"),
    "length_and_chunked": (OPEN + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                           400, "request_malformed"),
    # malformed chunked bodies (HEAD: bottle's chunked reader raised -> 500)
    "chunk_size_not_hex": (_chunked(b"zz\r\n{}\r\n0\r\n\r\n"), 400, "chunked_malformed"),
    "chunk_size_negative": (_chunked(b"-2\r\n{}\r\n0\r\n\r\n"), 400, "chunked_malformed"),
    "chunk_size_overflow": (_chunked(b"f" * 40 + b"\r\n{}\r\n0\r\n\r\n"), 400, "chunked_malformed"),
    "chunk_without_crlf": (_chunked(b"2\r\n{}0\r\n\r\n"), 400, "chunked_malformed"),
    "chunk_longer_than_said": (_chunked(b"2\r\n{}xyz\r\n0\r\n\r\n"), 400, "chunked_malformed"),
    "chunk_past_the_cap": (_chunked(b"4000000\r\n{}"), 413, "body_too_large"),
    "coding_gzip": (OPEN + b"Transfer-Encoding: gzip\r\n\r\n{}", 400, "transfer_encoding_unsupported"),
    "coding_chunked_twice": (OPEN + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400,
                             "transfer_encoding_unsupported"),
    # deeply nested JSON (HEAD: RecursionError in json.loads -> 500), however it is framed
    "json_deep_array": (_length(b"60001", b"[" * 30_000 + b"1" + b"]" * 30_000), 400, "json_too_deep"),
    "json_deep_object": (_length(b"%d" % (5 * 5_000 + 1 + 5_000), b'{"a":' * 5_000 + b"1" + b"}" * 5_000), 400,
                         "json_too_deep"),
    "json_deep_chunked": (_chunked(b"%x\r\n" % 20_001 + b"[" * 10_000 + b"1" + b"]" * 10_000 + b"\r\n0\r\n\r\n"),
                          400, "json_too_deep"),
    # request line and header fields
    "version_2": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400, "http_version_unsupported"),
    "request_line_garbage": (b"\xff\xfe\x00 / HTTP/1.1\r\n\r\n", 400, "request_malformed"),
    "header_without_colon": (b"GET / HTTP/1.1\r\nHost: x\r\nNo-Colon\r\n\r\n", 400, "header_malformed"),
    "header_folded": (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400, "header_malformed"),
    "header_too_large": (b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431, "headers_too_large"),
    "too_many_fields": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n", 431,
                        "headers_too_large"),
    "expect_other": (b"GET / HTTP/1.1\r\nExpect: magic\r\n\r\n", 417, "expectation_failed"),
    "path_not_utf8": (b"GET /static/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n", 400, "request_malformed"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_requests_get_a_4xx_json_error_and_change_nothing(hotspot: Hotspot, name: str):
    data, status, code = CASES[name]
    snapshot = state_of(hotspot)
    hotspot.open_payer(30_000)  # a channel in memory and its key mark on disk: something to change
    before = snapshot()
    answer = exchange("127.0.0.1", hotspot.http.port, data)
    assert answer.status == status, (answer.status, answer.body[:300])
    assert "application/json" in answer.headers["content-type"]
    assert json.loads(answer.body)["error"]["code"] == code
    assert snapshot() == before
    assert exchange("127.0.0.1", hotspot.http.port, b"GET /api/offer HTTP/1.1\r\nHost: x\r\n\r\n").status == 200


def test_a_well_framed_chunked_open_is_served(hotspot: Hotspot):
    """Chunked framing itself is fine (HTTP/1.1 clients may send it): decoded, then answered."""
    from tests.support.coins import key_address, new_key

    body = json.dumps({"client_pubkey": bytes(new_key().pub).hex(), "deposit": 30_000,
                       "refund_address": key_address(new_key())}).encode()
    pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    answer = exchange("127.0.0.1", hotspot.http.port, _chunked(pieces, b"0\r\n\r\n"))
    assert answer.status == 200 and json.loads(answer.body)["state"] == "awaiting_funding"


def test_keep_alive_and_pipelined_requests_are_answered_in_order(hotspot: Hotspot):
    two = b"GET /api/offer HTTP/1.1\r\nHost: x\r\n\r\nGET /api/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = exchange("127.0.0.1", hotspot.http.port, two)
    assert answer.status == 200
    assert json.loads(answer.body)["network"]
    assert answer.after.startswith(b"HTTP/1.1 404") and b'"not_found"' in answer.after


def test_a_client_over_its_request_rate_gets_429_and_others_are_served(hotspot: Hotspot):
    """Per source address: `client_burst` requests at once, then 429 rate_limited with a
    Retry-After (HEAD: no limit at all); another address is not held back by it."""
    from bitmesh.portal.api import make_app
    from bitmesh.portal.httpserver import HttpServer, Limits

    limits = Limits(client_rate=0.5, client_burst=5, exempt_loopback=False)
    server = HttpServer(make_app(hotspot.manager, "test-node"), [("127.0.0.1", 0)], limits)
    server.start()
    try:
        offer = b"GET /api/offer HTTP/1.1\r\nHost: x\r\n\r\n"
        got = [exchange("127.0.0.1", server.port, offer, source="127.0.0.7") for _ in range(limits.client_burst + 2)]
        assert [a.status for a in got] == [200] * limits.client_burst + [429, 429]
        assert json.loads(got[-1].body)["error"]["code"] == "rate_limited" and int(got[-1].headers["retry-after"]) >= 1
        assert exchange("127.0.0.1", server.port, offer, source="127.0.0.8").status == 200
    finally:
        server.stop()


def test_one_server_serves_ipv4_and_ipv6_from_one_io_thread_and_one_pool():
    """The LAN's IPv4 and IPv6 portal addresses share one I/O thread and one worker pool (two
    servers doubled the threads: some 1 MB resident of per-thread allocator caches on glibc);
    each request learns the address it came in on (SERVER_NAME, SERVER_PORT)."""
    import threading

    import bottle

    from bitmesh.portal.httpserver import HttpServer, Limits

    app = bottle.Bottle()
    app.route("/where", "GET", lambda: "{SERVER_NAME} {SERVER_PORT}".format(**bottle.request.environ))
    before = set(threading.enumerate())
    server = HttpServer(app, [("127.0.0.1", 0), ("::1", 0)], Limits(workers=3))
    server.start()
    try:
        (v4, p4), (v6, p6) = server._listeners.values()
        assert (v4, v6) == ("127.0.0.1", "::1") and p4 != p6
        for host, port in ((v4, p4), (v6, p6)):
            answer = exchange(host, port, b"GET /where HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert answer.status == 200 and answer.body.decode() == f"{host} {port}"
        new = [t.name for t in threading.enumerate() if t not in before]
        assert sorted(new) == ["http", "http-worker-0", "http-worker-1", "http-worker-2"], new
    finally:
        server.stop()
    assert all(sock.fileno() == -1 for sock in server._listeners)
