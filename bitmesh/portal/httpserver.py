"""The portal's HTTP/1.1 server (stdlib only): one I/O thread, a bounded pool of WSGI workers.

Every device on the hotspot reaches this server before it has paid, so it is built to stay up
under whatever an unpaid client sends (docs/security.md, "The portal under attack and load"):

- The I/O thread (selectors) reads each request whole, under deadlines and size caps, before
  a worker sees it: an idle or slowly sent request costs a socket and a small buffer, never a
  thread. Workers run the application on complete requests only and hand back complete
  answers, which the I/O thread writes.
- Framing is checked strictly (RFC 9112): malformed input gets a 4xx JSON answer with a stable
  code and the connection is closed. A body over the cap is refused as soon as it is announced
  (Content-Length) or grows past it (chunked), and is never buffered beyond the cap.
- Per client (source address): a cap on connections, on requests at the workers at once (the
  rest wait their turn) and a token-bucket request rate. In total: a connection cap (the
  longest-idle connection makes room first) and a bounded request queue (503 beyond it).
- Answers that never change while the service runs (the splash page: the application's
  `fixed_answers`) are written by the I/O thread from memory.

Loopback is the router itself: no LAN packet can carry a 127/8 or ::1 source (the kernel drops
such martians), so the per-client limits leave it alone unless `Limits.exempt_loopback` is off.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import ipaddress
import json
import logging
import queue
import re
import selectors
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    workers: int = 8  # threads running the application
    # Requests waiting for a worker beyond those running; then 503 server_busy. Sized for a router's
    # devices all polling at once (200 wallets: one session read each every few seconds): a queued
    # request is one whose bytes its connection holds already (max_connections caps those).
    queue: int = 256
    # A request that waited this long for a worker is answered 503 server_busy without running: its
    # client may have given up (wallets wait 30 s), and a payment taken after its payer stopped
    # waiting is one the payer does not know was acknowledged.
    queue_wait: float = 10.0
    max_connections: int = 512  # open at once; at the cap the longest-idle one is closed first
    client_connections: int = 16  # per source address; beyond: 429 too_many_connections
    client_inflight: int = 4  # per source address, at the workers at once; the others wait
    client_rate: float = 20.0  # requests per second per source address (token bucket) ...
    client_burst: int = 60  # ... with this many at once; beyond: 429 rate_limited
    head_bytes: int = 16 * 1024  # request line and header fields; beyond: 431 headers_too_large
    head_fields: int = 64
    body_bytes: int = 64 * 1024  # the body however it is framed; beyond: 413 body_too_large
    idle_timeout: float = 5.0  # a connection with no byte of a request yet (new or kept alive)
    header_timeout: float = 10.0  # from a request's first byte to the end of its header
    body_timeout: float = 10.0  # from the end of the header to the end of the body
    write_timeout: float = 10.0  # for an answer to be taken by the client
    requests_per_connection: int = 100
    exempt_loopback: bool = True


@dataclass(frozen=True)
class FixedAnswer:
    """An answer that never changes while the service runs, e.g. the splash page."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class Refusal(Exception):
    """A request refused before the application saw it: answered as JSON, then closed."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class TokenBuckets:
    """Per-key token buckets (`rate` tokens a second, at most `burst`): `take(key)` is 0 when a
    token was taken, else the seconds until one is there. Keys whose bucket is full again are
    forgotten (prune), so the table only holds recently active keys. Not thread-safe by
    itself: the HTTP server uses it from its I/O thread, the API under a lock."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str) -> float:
        now = self.clock()
        tokens, when = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def prune(self) -> None:
        now = self.clock()
        full = [k for k, (tokens, when) in self._buckets.items() if tokens + (now - when) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def client_ip(addr: str) -> str:
    """A peer address as the portal names it: IPv4-mapped IPv6 (a dual-stack socket) as IPv4."""
    return addr[7:] if addr.startswith("::ffff:") else addr


# --- HTTP/1.1 framing (RFC 9112) ----------------------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,18}\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_MAX_CHUNK_LINE = 1024
_MAX_CHUNKS = 4096
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "content-length", "date"))
_REASONS = {100: "Continue", 200: "OK", 204: "No Content", 302: "Found", 304: "Not Modified",
            400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 409: "Conflict", 413: "Content Too Large", 417: "Expectation Failed",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 507: "Insufficient Storage"}


@dataclass
class Head:
    method: str
    target: str
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    fields: list[tuple[str, str]]  # (lower-case name, value) in order
    length: int = 0  # body bytes announced by Content-Length (0: none)
    chunked: bool = False
    keep_alive: bool = False
    expect_continue: bool = False


def parse_head(raw: bytes, max_fields: int) -> Head:
    """The request line and header fields (without the blank line); Refusal(400 ...) if malformed."""
    lines = raw.split(b"\n")
    if any(line.endswith(b"\r") for line in lines):
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1] or _TARGET_BAD.search(parts[1]):
        raise Refusal(400, "request_malformed", "malformed request line")
    if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Refusal(400, "http_version_unsupported", "only HTTP/1.0 and HTTP/1.1 are served")
    if len(lines) - 1 > max_fields:
        raise Refusal(431, "headers_too_large", f"more than {max_fields} header fields")
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name) or _VALUE_BAD.search(value):
            raise Refusal(400, "header_malformed", "malformed header field")
        fields.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    head = Head(parts[0].decode("ascii"), parts[1].decode("latin-1"), parts[2].decode("ascii"), fields)
    lengths = [v for n, v in fields if n == "content-length"]
    codings = [c.strip().lower() for n, v in fields if n == "transfer-encoding" for c in v.split(",")]
    if codings:
        if lengths:  # the smuggling pair: which one frames the body is ambiguous
            raise Refusal(400, "request_malformed", "both Content-Length and Transfer-Encoding")
        if codings != ["chunked"] or head.version != "HTTP/1.1":
            raise Refusal(400, "transfer_encoding_unsupported", "only Transfer-Encoding: chunked (HTTP/1.1)")
        head.chunked = True
    elif lengths:
        values = {v.strip() for value in lengths for v in value.split(",")}
        if len(values) != 1 or not _DIGITS.match(next(iter(values))):
            raise Refusal(400, "content_length_invalid", "Content-Length must be one decimal number")
        head.length = int(next(iter(values)))
    if sum(1 for n, _ in fields if n == "host") > 1:
        raise Refusal(400, "header_malformed", "more than one Host")
    tokens = {t.strip().lower() for n, v in fields if n == "connection" for t in v.split(",")}
    head.keep_alive = "close" not in tokens if head.version == "HTTP/1.1" else "keep-alive" in tokens
    expect = [v.strip().lower() for n, v in fields if n == "expect"]
    if expect:
        if expect != ["100-continue"]:
            raise Refusal(417, "expectation_failed", "only Expect: 100-continue is understood")
        head.expect_continue = True
    return head


class ChunkedBody:
    """An incremental decoder of a chunked body: `feed` consumes what it can of the buffer and
    says whether the body is complete; it refuses a body past `limit` bytes as soon as a chunk
    announces more, and any malformed chunk line."""

    def __init__(self, limit: int):
        self.limit = limit
        self.body = bytearray()
        self._need = -1  # data bytes left in the current chunk; -1: a size line is next
        self._trailers = False
        self._trailer_bytes = 0
        self._chunks = 0

    def feed(self, buf: bytearray) -> bool:
        while True:
            if self._need > 0:
                take = min(self._need, len(buf))
                self.body += buf[:take]
                del buf[:take]
                self._need -= take
                if self._need:
                    return False
                self._need = -2  # the CRLF after the data
            if self._need == -2:
                if buf[:2] == b"\r\n":
                    del buf[:2]
                elif buf[:1] == b"\n":
                    del buf[:1]
                elif not buf or buf == b"\r":
                    return False
                else:
                    raise Refusal(400, "chunked_malformed", "chunk data not followed by CRLF")
                self._need = -1
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > _MAX_CHUNK_LINE:
                    raise Refusal(400, "chunked_malformed", "chunk line too long")
                return False
            line = bytes(buf[:end]).rstrip(b"\r")
            del buf[:end + 1]
            if self._trailers:
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > _MAX_CHUNK_LINE * 8:
                    raise Refusal(431, "headers_too_large", "trailer fields too large")
                if not line:
                    return True
                continue
            size = line.split(b";", 1)[0].rstrip(b" \t")
            if not _HEX.match(size):
                raise Refusal(400, "chunked_malformed", "chunk size is not a hexadecimal number")
            n = int(size, 16)
            if len(self.body) + n > self.limit:
                raise Refusal(413, "body_too_large", f"body larger than {self.limit} bytes")
            if n == 0:
                self._trailers = True
                continue
            self._chunks += 1
            if self._chunks > _MAX_CHUNKS:  # tiny chunks: CPU for nothing
                raise Refusal(400, "chunked_malformed", f"more than {_MAX_CHUNKS} chunks")
            self._need = n


def _http_date(now: float) -> str:
    t = time.gmtime(now)
    day = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[t.tm_wday]
    month = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")[t.tm_mon - 1]
    return f"{day}, {t.tm_mday:02d} {month} {t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"


def error_answer(status: int, code: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    extra = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode() + body


# --- connections --------------------------------------------------------------------------------

_READING, _DISPATCHED, _WRITING, _LINGER, _CLOSED = range(5)
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 256 * 1024


@dataclass(eq=False)
class _Client:
    connections: int = 0
    inflight: int = 0
    parked: collections.deque = field(default_factory=collections.deque)


class _Conn:
    __slots__ = ("sock", "ip", "port", "limited", "server", "buf", "state", "deadline", "head", "chunked",
                 "started", "out", "keep", "requests", "watching", "idle_since", "discarded", "scanned")

    def __init__(self, sock: socket.socket, ip: str, port: int, limited: bool, server: tuple[str, int], now: float,
                 idle: float):
        self.sock, self.ip, self.port, self.limited = sock, ip, port, limited
        self.server = server  # the listening address it came in on (SERVER_NAME, SERVER_PORT)
        self.buf = bytearray()
        self.state = _READING
        self.deadline = now + idle
        self.head: Head | None = None
        self.chunked: ChunkedBody | None = None
        self.started = False  # a byte of the current request has arrived
        self.out: memoryview | None = None
        self.keep = False
        self.requests = 0
        self.watching = 0  # selector events registered
        self.idle_since = now
        self.discarded = 0
        self.scanned = 0  # header bytes already searched for the blank line


@dataclass
class _Job:
    conn: _Conn
    head: Head
    body: bytes
    answer: bytes = b""
    queued_at: float = 0.0  # monotonic


class HttpServer:
    """Serves `app` on every (host, port) of `listen` (the LAN's IPv4 and IPv6) from one I/O
    thread and one worker pool: a second server per address family would double the threads
    and their per-thread allocator caches, some 1 MB resident on glibc."""

    def __init__(self, app, listen: list[tuple[str, int]], limits: Limits | None = None):
        if not listen:
            raise ValueError("HttpServer needs at least one address to listen on")
        self.app = app
        self.limits = limits or Limits()
        self._listeners: dict[socket.socket, tuple[str, int]] = {}
        try:
            for host, port in listen:
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                self._listeners[sock] = (host, port)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(256)
                sock.setblocking(False)
                self._listeners[sock] = (host, sock.getsockname()[1])
        except OSError:
            for sock in self._listeners:
                sock.close()
            raise
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: dict[int, _Conn] = {}
        self._clients: dict[str, _Client] = {}
        self._buckets = TokenBuckets(self.limits.client_rate, self.limits.client_burst)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._done: collections.deque[_Job] = collections.deque()
        self._at_workers = 0  # jobs queued or running
        self._workers: list[threading.Thread] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accept_paused_until = 0.0
        self._fixed = {path: self._fixed_variants(a) for path, a in (getattr(app, "fixed_answers", None) or {}).items()}
        self._date = ("", 0)
        self.refusals: collections.Counter[str] = collections.Counter()  # code -> count, for tests and logs

    @property
    def port(self) -> int:
        """The port of the first address (all of them, unless `listen` named different ones)."""
        return next(iter(self._listeners.values()))[1]

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        for i in range(self.limits.workers):
            t = threading.Thread(target=self._work, name=f"http-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        self._listen(True)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        next_sweep = 0.0
        try:
            while not self._stopping:
                for key, mask in self._sel.select(0.25):
                    if key.fileobj in self._listeners:
                        self._accept(key.fileobj)
                    elif key.fileobj is self._wake_r:
                        self._finish_jobs()
                    else:
                        self._on_event(key.data, mask)
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + 0.25
                    self._sweep(now)
        finally:
            self._close_all()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
        for sock in self._listeners:
            sock.close()

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        for _ in self._workers:
            self._jobs.put(None)
        self._listen(False)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed (stopped)

    # --- accepting ----------------------------------------------------------------------------

    def _listen(self, on: bool) -> None:
        """Watch the listening sockets for connections, or stop watching them."""
        for sock in self._listeners:
            with contextlib.suppress(OSError, KeyError, ValueError):  # closed, or already so
                if on:
                    self._sel.register(sock, selectors.EVENT_READ, None)
                else:
                    self._sel.unregister(sock)

    def _accept(self, listener: socket.socket) -> None:
        now = time.monotonic()
        for _ in range(64):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("portal: cannot accept (%s); pausing for 1 s", e)
                    self._listen(False)
                    self._accept_paused_until = now + 1.0
                    return
                continue  # ECONNABORTED & co.: that one is gone
            sock.setblocking(False)
            ip = client_ip(addr[0])
            limited = not (self.limits.exempt_loopback and is_loopback(ip))
            client = self._clients.get(ip)
            if limited and client is not None and client.connections >= self.limits.client_connections:
                self._refuse_at_accept(sock, 429, "too_many_connections",
                                       f"more than {self.limits.client_connections} connections from {ip}")
                continue
            if len(self._conns) >= self.limits.max_connections and not self._evict_idle():
                self._refuse_at_accept(sock, 503, "server_busy", "too many connections; retry shortly")
                continue
            if client is None:
                client = self._clients[ip] = _Client()
            client.connections += 1
            conn = _Conn(sock, ip, addr[1], limited, self._listeners[listener], now, self.limits.idle_timeout)
            self._conns[sock.fileno()] = conn
            self._watch(conn, selectors.EVENT_READ)

    def _refuse_at_accept(self, sock: socket.socket, status: int, code: str, message: str) -> None:
        self.refusals[code] += 1
        with _quiet():
            sock.send(error_answer(status, code, message, retry_after=1))
        sock.close()

    def _evict_idle(self) -> bool:
        """At the connection cap: close the connection idle the longest (no byte of a request
        yet), so idle sockets cannot lock out the clients that have something to ask."""
        idle = [c for c in self._conns.values() if c.state == _READING and not c.started]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since)
        self.refusals["evicted_idle"] += 1
        self._close(victim)
        return True

    # --- reading ------------------------------------------------------------------------------

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if conn.state == _WRITING and mask & selectors.EVENT_WRITE:
            self._write_more(conn)
        elif conn.state == _READING and mask & selectors.EVENT_READ:
            self._read(conn)
        elif conn.state == _LINGER:
            self._linger(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)  # the client went away (before or between requests, or mid-request)
            return
        conn.buf += data
        try:
            self._advance(conn)
        except Refusal as r:
            self._refuse(conn, r)

    def _advance(self, conn: _Conn) -> None:
        """Takes what the buffer holds as far as it goes: the header, then the body; a complete
        request is answered (fixed answers) or handed to the workers."""
        now = time.monotonic()
        limits = self.limits
        if conn.head is None:
            if not conn.started:
                stripped = conn.buf.lstrip(b"\r\n")  # empty lines before a request are ignored
                if len(stripped) != len(conn.buf):
                    del conn.buf[:len(conn.buf) - len(stripped)]
                if not conn.buf:
                    return
                conn.started = True
                conn.deadline = now + limits.header_timeout
            end = _HEAD_END.search(conn.buf, max(0, conn.scanned - 3), limits.head_bytes + 4)
            if end is None:
                conn.scanned = len(conn.buf)
                if len(conn.buf) > limits.head_bytes:
                    raise Refusal(431, "headers_too_large", f"request header larger than {limits.head_bytes} bytes")
                return
            head = parse_head(bytes(conn.buf[:end.start()]), limits.head_fields)
            del conn.buf[:end.end()]
            conn.scanned = 0
            if conn.limited:
                wait = self._buckets.take(conn.ip)
                if wait:
                    raise Refusal(429, "rate_limited", f"more than {limits.client_rate:g} requests per second",
                                  retry_after=max(1, int(wait + 0.999)))
            if head.length > limits.body_bytes:
                raise Refusal(413, "body_too_large", f"body larger than {limits.body_bytes} bytes")
            conn.head = head
            conn.deadline = now + limits.body_timeout
            conn.chunked = ChunkedBody(limits.body_bytes) if head.chunked else None
            if head.expect_continue and (head.chunked or len(conn.buf) < head.length):
                with _quiet():  # a client that does not read it still sends its body
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        head = conn.head
        if conn.chunked is not None:
            if not conn.chunked.feed(conn.buf):
                return
            body = bytes(conn.chunked.body)
        else:
            if len(conn.buf) < head.length:
                return
            body = bytes(conn.buf[:head.length])
            del conn.buf[:head.length]
        conn.head, conn.chunked, conn.started = None, None, False
        conn.requests += 1
        conn.keep = head.keep_alive and conn.requests < limits.requests_per_connection and not self._stopping
        fixed = self._fixed.get(head.target.split("?", 1)[0]) if head.method in ("GET", "HEAD") else None
        if fixed is not None:
            self._send(conn, self._fixed_answer(fixed, head, conn.keep))
            return
        self._dispatch(conn, _Job(conn, head, body))

    # --- the workers --------------------------------------------------------------------------

    def _dispatch(self, conn: _Conn, job: _Job) -> None:
        self._unwatch(conn)
        conn.state = _DISPATCHED
        client = self._clients[conn.ip]
        if conn.limited and client.inflight >= self.limits.client_inflight:
            client.parked.append(job)  # its turn comes when one of the client's requests is done
            return
        self._submit(client, job)

    def _submit(self, client: _Client, job: _Job) -> None:
        if self._at_workers >= self.limits.workers + self.limits.queue:
            self._refuse(job.conn, Refusal(503, "server_busy", "the portal is busy; retry shortly", retry_after=1))
            return
        client.inflight += 1
        self._at_workers += 1
        job.queued_at = time.monotonic()
        self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if time.monotonic() - job.queued_at > self.limits.queue_wait:
                    self.refusals["server_busy"] += 1
                    job.answer = error_answer(503, "server_busy", "the portal is busy; retry shortly", retry_after=1)
                    job.conn.keep = False
                else:
                    job.answer = self._run_app(job)
            except Exception:  # never leave a connection without an answer
                log.exception("portal: answering %s %s failed", job.head.method, job.head.target)
                job.answer = error_answer(500, "internal_error", "internal error")
                job.conn.keep = False
            self._done.append(job)
            self._wake()

    def _finish_jobs(self) -> None:
        with _quiet():
            while self._wake_r.recv(4096):
                pass
        while self._done:
            job = self._done.popleft()
            self._at_workers -= 1
            client = self._clients.get(job.conn.ip)
            if client is not None:
                client.inflight -= 1
                while client.parked and client.inflight < self.limits.client_inflight:
                    nxt = client.parked.popleft()
                    if nxt.conn.state == _DISPATCHED:
                        self._submit(client, nxt)
                if client.connections <= 0 and client.inflight <= 0:
                    del self._clients[job.conn.ip]
            if job.conn.state == _DISPATCHED:
                self._send(job.conn, job.answer)

    def _environ(self, job: _Job) -> dict:
        head, conn = job.head, job.conn
        target = head.target
        if target.startswith(("http://", "https://")):  # absolute form: the host is the request's
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path, _, query = target.partition("?")
        env = {
            "REQUEST_METHOD": head.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": conn.server[0],
            "SERVER_PORT": str(conn.server[1]),
            "SERVER_PROTOCOL": head.version,
            "REMOTE_ADDR": conn.ip,
            "REMOTE_PORT": str(conn.port),
            "CONTENT_LENGTH": str(len(job.body)),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(job.body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in head.fields:
            if name in ("content-length", "transfer-encoding") or "_" in name:
                continue  # framing is the server's; `_` names would alias `-` ones
            key = "CONTENT_TYPE" if name == "content-type" else "HTTP_" + name.upper().replace("-", "_")
            env[key] = f"{env[key]}, {value}" if key in env else value
        return env

    def _run_app(self, job: _Job) -> bytes:
        started: list = []

        def start_response(status, headers, exc_info=None):
            if exc_info and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return chunks.append

        chunks: list[bytes] = []
        result = self.app(self._environ(job), start_response)
        try:
            for chunk in result:
                chunks.append(chunk)
        finally:
            if hasattr(result, "close"):
                result.close()
        if not started:
            raise RuntimeError("the application did not start a response")
        status, headers = started
        code = int(status[:3])
        body = b"".join(chunks)
        lines = [f"HTTP/1.1 {status}"]
        length = None
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length":
                length = value
            if lower not in _HOP_BY_HOP:
                lines.append(f"{name}: {value}")
        if code >= 200 and code not in (204, 304):
            # HEAD: the length the GET would have (the application's), no body
            lines.append(f"Content-Length: {length if job.head.method == 'HEAD' and length else len(body)}")
        if job.head.method == "HEAD" or code in (204, 304):
            body = b""
        lines.append(self._date_line())
        lines.append(self._connection_line(job.conn.keep))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    # --- writing ------------------------------------------------------------------------------

    def _fixed_variants(self, answer: FixedAnswer) -> dict[tuple[bool, bool], bytes]:
        """The answer's bytes for (HEAD?, keep-alive?), less the Date line."""
        head = [f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'OK')}"]
        head += [f"{n}: {v}" for n, v in answer.headers if n.lower() not in _HOP_BY_HOP]
        head.append(f"Content-Length: {len(answer.body)}")
        out = {}
        for is_head in (False, True):
            for keep in (False, True):
                conn_line = "Connection: keep-alive" if keep else "Connection: close"
                out[is_head, keep] = (("\r\n".join([*head, conn_line]) + "\r\n").encode("latin-1"),
                                      b"" if is_head else answer.body)
        return out

    def _fixed_answer(self, variants: dict, head: Head, keep: bool) -> bytes:
        top, body = variants[head.method == "HEAD", keep]
        return top + self._date_line().encode() + b"\r\n\r\n" + body

    def _date_line(self) -> str:
        now = int(time.time())
        if self._date[1] != now:
            self._date = (f"Date: {_http_date(now)}", now)
        return self._date[0]

    @staticmethod
    def _connection_line(keep: bool) -> str:
        return "Connection: keep-alive" if keep else "Connection: close"

    def _send(self, conn: _Conn, data: bytes) -> None:
        conn.state = _WRITING
        conn.out = memoryview(data)
        conn.deadline = time.monotonic() + self.limits.write_timeout
        self._write_more(conn)

    def _write_more(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        conn.out = None
        if not conn.keep:
            self._close(conn)
            return
        now = time.monotonic()
        conn.state, conn.deadline, conn.idle_since = _READING, now + self.limits.idle_timeout, now
        self._watch(conn, selectors.EVENT_READ)
        if conn.buf:  # the next request was pipelined behind this one
            try:
                self._advance(conn)
            except Refusal as r:
                self._refuse(conn, r)

    def _refuse(self, conn: _Conn, refusal: Refusal) -> None:
        """Answer a refusal, then close: after bad framing nothing more on the connection can be
        trusted. The unread rest is drained a little first, so the client gets to read the
        answer instead of a reset."""
        self.refusals[refusal.code] += 1
        conn.keep = False
        data = error_answer(refusal.status, refusal.code, str(refusal), refusal.retry_after)
        try:
            sent = conn.sock.send(data)
        except OSError:
            self._close(conn)
            return
        if sent < len(data):
            self._close(conn)  # a client that does not read: no more effort
            return
        with _quiet():
            conn.sock.shutdown(socket.SHUT_WR)
        conn.state, conn.deadline, conn.discarded = _LINGER, time.monotonic() + _LINGER_SECONDS, 0
        conn.buf.clear()
        self._watch(conn, selectors.EVENT_READ)

    def _linger(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.discarded += len(data)
        if not data or conn.discarded > _LINGER_BYTES:
            self._close(conn)

    # --- bookkeeping --------------------------------------------------------------------------

    def _watch(self, conn: _Conn, events: int) -> None:
        if conn.watching == events:
            return
        if conn.watching:
            self._sel.modify(conn.sock, events, conn)
        else:
            self._sel.register(conn.sock, events, conn)
        conn.watching = events

    def _unwatch(self, conn: _Conn) -> None:
        if conn.watching:
            self._sel.unregister(conn.sock)
            conn.watching = 0

    def _close(self, conn: _Conn) -> None:
        if conn.state == _CLOSED:
            return
        if conn.state == _DISPATCHED:  # stopping: drop it from its client's waiting line
            client = self._clients.get(conn.ip)
            if client is not None:
                for job in [j for j in client.parked if j.conn is conn]:
                    client.parked.remove(job)
        conn.state = _CLOSED
        self._unwatch(conn)
        self._conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        client = self._clients.get(conn.ip)
        if client is not None:
            client.connections -= 1
            if client.connections <= 0 and client.inflight <= 0:
                del self._clients[conn.ip]

    def _sweep(self, now: float) -> None:
        """Deadlines: idle connections close quietly, slow requests get a 408, slow readers and
        lingering closes are cut."""
        for conn in list(self._conns.values()):
            if conn.state == _DISPATCHED or now < conn.deadline:
                continue
            if conn.state == _READING and (conn.started or conn.head is not None):
                self._refuse(conn, Refusal(408, "request_timeout", "the request did not arrive in time"))
            else:
                self.refusals["timeout_closed"] += conn.state == _READING
                self._close(conn)
        self._buckets.prune()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._listen(True)


class _quiet:
    """Ignore OSError (a peer gone, a socket already closed)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)

