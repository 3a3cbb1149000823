"""The portal under attack, against the real `bitmesh serve` (firewall on) in a router namespace,
from unpaid client namespaces (issue 10, item 7): what the server process itself must hold
(threads, memory, held connections, bodies it reads) is measured on that process.

- a chunked body is refused once it grows past the cap, never read (or spooled) whole;
- slowly sent headers (slowloris) are cut by the header timeout, and do not keep others out;
- a thousand idle connections from a hundred devices cost no thread and little memory: the
  connection cap closes the longest-idle, the idle timeout the rest;
- channel opens are rate-limited per device (MAC), and a refused open changes no file.

Malformed framing and JSON (no 500) are tested in-process: tests/test_portal_http.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitmesh.portal.api import OpenLimit
from bitmesh.portal.httpserver import Limits
from tests.support.coins import key_address, new_key
from tests.support.netns import Topology
from tests.support.router import REPO, RouterService, python_in

pytestmark = [
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

LIMITS = Limits()


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=2) as t:
        t.bridge_tcp(t.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        yield t


@pytest.fixture
def service(topo, bcoin, tmp_path):
    s = RouterService(topo, bcoin, tmp_path / "router").start()
    yield s
    s.stop()


def process_status(pid: int) -> dict[str, int]:
    """Threads, VmRSS (kB) of a process (`ip netns exec` execs the service: same pid)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Threads", "VmRSS"):
            out[name] = int(value.split()[0])
    return out


def python_popen(ns: str, code: str, *args: str) -> subprocess.Popen:
    """Python `code` running in `ns` in the background (python_in waits for it); stdout piped."""
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)


def splash_ms(topo: Topology, url: str) -> float:
    """One splash page fetched by client 2 (another device): its time in ms, or fails."""
    out = python_in(topo.clients[1].ns, _SPLASH, url, timeout=30)
    return json.loads(out.stdout)


_SPLASH = r"""
import json, sys, time, urllib.request
t = time.perf_counter()
with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1] + "/", timeout=10) as r:
    assert r.status == 200 and b"<html" in r.read().lower()
print(json.dumps((time.perf_counter() - t) * 1000))
"""

# A chunked POST whose body keeps coming: `announce` one big chunk, or many small chunks past
# the cap, then push up to 64 MiB more. Prints the answer's status line and code (or None),
# the bytes sent before the answer came, and the bytes the server took before it hung up.
_CHUNKED = r"""
import json, select, socket, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=5)
s.sendall(b"POST /api/channels HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Transfer-Encoding: chunked\r\n\r\n")
sent, answer, answered_at = 0, b"", None
piece = b"1000\r\n" + b"a" * 4096 + b"\r\n"  # 4 KiB chunks
if mode == "announce":
    s.sendall(b"4000000\r\n")  # one chunk of 64 MiB announced
def poll_answer(wait):
    global answer, answered_at
    if answered_at is None and select.select([s], [], [], wait)[0]:
        try:
            answer = s.recv(65536)
        except OSError:
            answer = b""
        answered_at = sent
if mode == "small":
    for _ in range(32):  # 128 KiB of small chunks: twice the cap, then wait for the answer
        s.sendall(piece)
        sent += len(piece)
poll_answer(5.0)
s.settimeout(5)
try:  # an attacker does not stop at the answer: push up to 64 MiB more
    while sent < 64 * 1024 * 1024:
        s.sendall(piece if mode == "small" else b"a" * 65536)
        sent += len(piece) if mode == "small" else 65536
        poll_answer(0)
except OSError as e:
    pass
line = answer.split(b"\r\n", 1)[0].decode("latin-1")
body = answer.partition(b"\r\n\r\n")[2]
code = json.loads(body)["error"]["code"] if body.startswith(b"{") else None
print(json.dumps({"status": line, "code": code, "answered_at": answered_at, "sent": sent}))
"""


@pytest.mark.parametrize("mode", ["small", "announce"])
def test_a_chunked_body_past_the_cap_is_refused_as_it_arrives_never_read_whole(topo, service, mode):
    """HEAD's wsgiref + bottle read a chunked body to its end (into a temporary file in RAM-backed
    /tmp on a router) before looking at it: 64 MiB from an unpaid client, then a 400."""
    before = process_status(service.proc.pid)
    out = json.loads(python_in(topo.clients[0].ns, _CHUNKED, topo.router.ipv4, str(service.port), mode,
                               timeout=120).stdout)
    assert out["status"] == "HTTP/1.1 413 Content Too Large" and out["code"] == "body_too_large", out
    # the answer came before the client had sent its 128 KiB (or its announced 64 MiB) ...
    assert out["answered_at"] is not None and out["answered_at"] <= 32 * (4096 + 8), out
    # ... and the server hung up instead of taking the rest: what the client could push is what
    # the socket buffers and the short drain after the answer hold, far from the 64 MiB
    assert out["sent"] < 16 * 1024 * 1024, out
    after = process_status(service.proc.pid)
    assert after["VmRSS"] - before["VmRSS"] < 4 * 1024, (before, after)
    assert splash_ms(topo, service.url) < 2000  # still serving


# `n` connections that each send a request's first line, then one header byte a second (slowloris).
# Prints, per connection, the seconds until the server ended it (None: still open) and its status.
_SLOWLORIS = r"""
import json, resource, select, socket, sys, time
host, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
t0 = time.monotonic()
conns, ended, status = [], {}, {}
for i in range(n):
    s = socket.create_connection((host, port), timeout=5)
    s.setblocking(False)
    try:
        s.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
    except OSError:
        pass
    conns.append(s)
next_byte = time.monotonic() + 1
while time.monotonic() - t0 < hold and len(ended) < n:
    live = [s for i, s in enumerate(conns) if i not in ended]
    for s in select.select(live, [], [], 0.1)[0]:
        i = conns.index(s)
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        status.setdefault(i, data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else None)
        if not data:
            ended[i] = round(time.monotonic() - t0, 2)
    if time.monotonic() >= next_byte:
        next_byte += 1
        for i, s in enumerate(conns):
            if i not in ended:
                try:
                    s.send(b"X")  # one byte of a header field that never ends
                except OSError:
                    pass
print(json.dumps({"ended": [ended.get(i) for i in range(n)], "status": [status.get(i) for i in range(n)]}))
"""


def test_slowloris_connections_are_cut_by_the_header_timeout_and_keep_nobody_out(topo, service):
    """HEAD had no header timeout: 50 connections sending a byte a second were all held after 60 s
    (and held 50 threads). Now: a device gets `client_connections` at once (the rest 429), each is
    answered 408 once the header takes longer than `header_timeout`, and another device is served
    meanwhile."""
    n, hold = 50, LIMITS.header_timeout + 6
    before = process_status(service.proc.pid)["Threads"]
    slow = python_popen(topo.clients[0].ns, _SLOWLORIS, topo.router.ipv4, str(service.port), str(n), str(hold))
    time.sleep(2)
    threads = process_status(service.proc.pid)["Threads"]
    assert splash_ms(topo, service.url) < 2000  # another device, while the slow ones are held
    out, _ = slow.communicate(timeout=hold + 30)
    result = json.loads(out)
    ended, status = result["ended"], result["status"]
    assert None not in ended, result  # nothing is held past the header timeout
    refused = [i for i, s in enumerate(status) if s == "429"]
    timed_out = [i for i, s in enumerate(status) if s == "408"]
    assert len(refused) == n - LIMITS.client_connections and len(timed_out) == LIMITS.client_connections, result
    assert all(LIMITS.header_timeout - 0.5 <= ended[i] <= LIMITS.header_timeout + 2 for i in timed_out), result
    assert threads <= before, (before, threads)  # the I/O thread and a fixed pool, however many connections


# `per` idle connections from each of the given source addresses (no byte sent), held `hold` s;
# prints how many the server had ended after `check` seconds and by the end.
_IDLE = r"""
import json, resource, select, socket, sys, time
host, port, per, check, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
sources = sys.argv[6:]
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
conns = []
for src in sources:
    for _ in range(per):
        s = socket.create_connection((host, port), timeout=5, source_address=(src, 0))
        s.setblocking(False)
        conns.append(s)
t0 = time.monotonic()
print(json.dumps({"opened": len(conns)}), flush=True)
ended, at_check = set(), None
while time.monotonic() - t0 < hold:
    live = [s for s in conns if s.fileno() not in ended]
    for s in select.select(live, [], [], 0.1)[0] if live else []:
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            ended.add(s.fileno())
    if at_check is None and time.monotonic() - t0 >= check:
        at_check = len(ended)
print(json.dumps({"ended_at_check": at_check, "ended": len(ended)}), flush=True)
"""


def test_a_thousand_idle_connections_cost_no_thread_and_are_closed(topo, service):
    """HEAD: one thread per connection and no idle timeout; 1,000 idle connections made 880 threads
    and 62 MB RSS. Now, from 100 devices (10 each, under the per-device cap): no thread more, a
    few MB at most, the connection cap closes the longest-idle ones, the idle timeout all of them."""
    devices = topo.macvlan_clients(topo.clients[0], 100)
    before = process_status(service.proc.pid)
    check = 2.0
    proc = python_popen(topo.clients[0].ns, _IDLE, topo.router.ipv4, str(service.port), "10", str(check),
                        str(LIMITS.idle_timeout + 3), *(d.ipv4 for d in devices))
    try:
        opened = json.loads(proc.stdout.readline())
        assert opened == {"opened": 1000}
        time.sleep(1)
        during = process_status(service.proc.pid)
        held = int(python_in(topo.router.ns, _HELD, topo.router.ipv4, str(service.port)).stdout)
        splash = splash_ms(topo, service.url)  # a device with something to ask still gets in
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(out)
    assert during["Threads"] <= before["Threads"], (before, during)
    assert during["VmRSS"] - before["VmRSS"] < 8 * 1024, (before, during)  # kB
    assert held <= LIMITS.max_connections, held
    assert result["ended_at_check"] >= 1000 - LIMITS.max_connections, result  # evicted at the cap
    assert result["ended"] == 1000, result  # and the idle timeout closed the rest
    assert splash < 2000


_HELD = r"""
import subprocess, sys
out = subprocess.run(["ss", "-Htn", "state", "established", "( sport = :" + sys.argv[2] + " )"],
                     capture_output=True, text=True, check=True).stdout
print(sum(1 for line in out.splitlines() if line.strip()))
"""

# `n` channel opens from this device, one after another; the status and error code of each.
_OPENS = r"""
import json, sys, urllib.error, urllib.request
url, n, pubkey, refund = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
out = []
for _ in range(n):
    body = json.dumps({"client_pubkey": pubkey, "deposit": 20000, "refund_address": refund}).encode()
    req = urllib.request.Request(url + "/api/channels", data=body, headers={"Content-Type": "application/json"})
    try:
        with opener.open(req, timeout=10) as r:
            out.append([r.status, None, None])
    except urllib.error.HTTPError as e:
        out.append([e.code, json.loads(e.read())["error"]["code"], e.headers.get("Retry-After")])
print(json.dumps(out))
"""


def test_channel_opens_are_rate_limited_per_device_and_a_refused_one_changes_nothing(topo, service):
    """HEAD: opens were unlimited (each reserves a key index on flash and an unfunded channel in
    memory). Now a device gets OpenLimit.burst at once, then 429 open_rate_limited with a
    Retry-After, and the refused open leaves every file of the state_dir as it was; another
    device still opens."""
    limit = OpenLimit()
    c1, c2 = topo.clients
    pubkey, refund = bytes(new_key().pub).hex(), key_address(new_key())
    opens = json.loads(python_in(c1.ns, _OPENS, service.url, str(limit.burst), pubkey, refund).stdout)
    assert [status for status, _, _ in opens] == [200] * limit.burst, opens
    state = service.workdir / "state"
    files = {p: p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file()}
    refused = json.loads(python_in(c1.ns, _OPENS, service.url, "2", pubkey, refund).stdout)
    assert all(status == 429 and code == "open_rate_limited" and int(retry) >= 1 for status, code, retry in refused)
    assert {p: p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file()} == files
    assert json.loads(python_in(c2.ns, _OPENS, service.url, "1", pubkey, refund).stdout)[0][0] == 200
