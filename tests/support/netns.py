"""A reusable three-part network topology in network namespaces, for real-packet tests.

    client(s) --veth-- [br-lan] router [wan] --veth-- upstream
    10.77.1.1x         10.77.1.1       10.77.2.1     10.77.2.2
    fd77:1::1x         fd77:1::1       fd77:2::1     fd77:2::2

Every namespace name starts with a prefix unique to this run, so parallel runs never collide;
all addresses live only inside these namespaces. `Topology` is a context manager: leaving it
(normally or by an exception) stops the processes it started and deletes its namespaces, and an
atexit hook does the same if the interpreter exits first. Needs root and iproute2.

Helpers run small Python programs inside a namespace (`call(ns, "http_get", url)`) so tests
use real sockets in the client, and start servers (`http_server`, `udp_echo`) that print READY.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = sys.executable or "python3"

# -- programs run inside namespaces ----------------------------------------------------------

HTTP_SERVER = r"""
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
body = sys.argv[1].encode()
ports = [int(p) for p in sys.argv[2].split(",")]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        try:
            if self.path.startswith("/bytes/"):
                n = int(self.path[7:])
                self.send_response(200)
                self.send_header("Content-Length", str(n))
                self.end_headers()
                chunk = b"x" * 16384
                while n > 0:
                    k = min(n, len(chunk))
                    self.wfile.write(chunk[:k])
                    n -= k
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        except OSError:
            pass
    def log_message(self, *a):
        pass
class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
for p in ports:
    srv = S(("::", p), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
print("READY", flush=True)
threading.Event().wait()
"""

UDP_ECHO = r"""
import select, socket, sys
socks = []
for p in [int(p) for p in sys.argv[1].split(",")]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", p))
    socks.append(s)
print("READY", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, addr = s.recvfrom(65535)
        s.sendto(data, addr)
"""

CLIENT_LIB = r"""
import json, socket, sys, time, urllib.request

def _opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))

def http_get(url, timeout=2.0):
    try:
        with _opener().open(url, timeout=timeout) as r:
            return {"ok": True, "status": r.status, "body": r.read(4096).decode("latin-1")}
    except Exception as e:
        return {"ok": False, "error": repr(e)}

def download(url, idle=1.0, rate=None, seconds=None):
    # Bytes of body received until the transfer ends or stalls for `idle` seconds; `rate`
    # (bytes/s) paces the reads, and TCP flow control paces the sender with them; `seconds`
    # stops reading after that long (an unfinished download then says "complete": False).
    n = 0
    start = time.monotonic()
    try:
        with _opener().open(url, timeout=idle) as r:
            while True:
                b = r.read(16384 if rate or seconds else 65536)
                if not b:
                    break
                n += len(b)
                if seconds is not None and time.monotonic() - start >= seconds:
                    return {"bytes": n, "complete": False, "error": "stopped after %s s" % seconds}
                if rate:
                    time.sleep(max(0.0, start + n / rate - time.monotonic()))
    except Exception as e:
        return {"bytes": n, "complete": False, "error": repr(e)}
    return {"bytes": n, "complete": True}

def udp_probe(host, port, n=3, timeout=0.3, source=None):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if source:
        s.bind((source, 0))
    s.settimeout(timeout)
    got = 0
    for i in range(n):
        s.sendto(b"probe%d" % i, (host, port))
        try:
            while True:
                data, _ = s.recvfrom(2048)
                if data == b"probe%d" % i:
                    got += 1
                    break
        except OSError:
            pass
    return {"sent": n, "replies": got}

def tcp_connect(host, port, timeout=1.0, source=None):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        return {"ok": True}
    except OSError as e:
        return {"ok": False, "error": repr(e)}
    finally:
        s.close()

def udp_until(host, port, until, interval=0.05, timeout=0.1):
    # Probe every `interval` until unix time `until`; report the first and last answered send.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    first = last = None
    first_fail_after = None
    i = 0
    while time.time() < until:
        t = time.time()
        msg = b"t%d" % i
        i += 1
        s.sendto(msg, (host, port))
        ok = False
        try:
            while True:
                data, _ = s.recvfrom(2048)
                if data == msg:
                    ok = True
                    break
        except OSError:
            pass
        if ok:
            first = t if first is None else first
            last = t
            first_fail_after = None
        elif last is not None and first_fail_after is None:
            first_fail_after = t
        time.sleep(max(0.0, interval - (time.time() - t)))
    return {"first_ok": first, "last_ok": last, "first_fail_after": first_fail_after}

if __name__ == "__main__":
    fn = globals()[sys.argv[1]]
    print(json.dumps(fn(*json.loads(sys.argv[2]), **json.loads(sys.argv[3]))))
"""

# Environment for programs in namespaces: no proxies from the caller's environment.
_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


@dataclass
class Host:
    ns: str
    ifname: str
    ipv4: str
    ipv6: str
    mac: str | None = None


@dataclass
class Topology:
    """`n_clients` client namespaces on the router's LAN bridge, one upstream namespace.

    gso=False caps GSO/TSO at one segment per packet on every veth, so each skb the router
    sees is one wire packet (needed to measure a quota cut to the packet).
    """

    n_clients: int = 2
    gso: bool = True
    prefix: str = field(default_factory=lambda: f"bm{os.getpid() % 100000}{secrets.token_hex(2)}")

    LAN = "br-lan"
    WAN = "wan"

    def __post_init__(self) -> None:
        self.router = Host(f"{self.prefix}-r", self.LAN, "10.77.1.1", "fd77:1::1")
        self.upstream = Host(f"{self.prefix}-u", "eth0", "10.77.2.2", "fd77:2::2")
        self.internet: Host | None = None  # two hops only (internet_behind_upstream)
        self.clients = [
            Host(f"{self.prefix}-c{i}", "eth0", f"10.77.1.{10 + i}", f"fd77:1::{10 + i:x}", f"02:77:00:00:00:{i:02x}")
            for i in range(1, self.n_clients + 1)
        ]
        self._procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self._bridges: list[socket.socket] = []
        self._files: list[Path] = []  # outside the namespaces: /etc/netns/<ns>, dnsmasq's folder

    @property
    def namespaces(self) -> list[str]:
        return [self.router.ns, self.upstream.ns, *(c.ns for c in self.clients)]

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Topology:
        atexit.register(self.down)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()
        atexit.unregister(self.down)

    def up(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            self._made.append(ns)
            self.sysctl(ns, "net.ipv6.conf.all.accept_dad", 0)
            self.sysctl(ns, "net.ipv6.conf.default.accept_dad", 0)
            _ip("-n", ns, "link", "set", "lo", "up")
        r, u = self.router, self.upstream
        self.sysctl(r.ns, "net.ipv4.ip_forward", 1)
        self.sysctl(r.ns, "net.ipv6.conf.all.forwarding", 1)
        _ip("-n", r.ns, "link", "add", self.LAN, "type", "bridge", "mcast_snooping", "0")
        _ip("-n", r.ns, "link", "set", self.LAN, "up")
        self._addr(r.ns, self.LAN, "10.77.1.1/24", "fd77:1::1/64")
        for i, c in enumerate(self.clients, 1):
            port = f"lan{i}"
            self._veth(r.ns, port, c.ns, c.ifname)
            _ip("-n", r.ns, "link", "set", port, "master", self.LAN, "up")
            _ip("-n", c.ns, "link", "set", c.ifname, "address", c.mac, "up")
            self._addr(c.ns, c.ifname, f"{c.ipv4}/24", f"{c.ipv6}/64")
            _ip("-n", c.ns, "route", "add", "default", "via", r.ipv4)
            _ip("-n", c.ns, "-6", "route", "add", "default", "via", r.ipv6)
        self._veth(r.ns, self.WAN, u.ns, u.ifname)
        _ip("-n", r.ns, "link", "set", self.WAN, "up")
        _ip("-n", u.ns, "link", "set", u.ifname, "up")
        self._addr(r.ns, self.WAN, "10.77.2.1/24", "fd77:2::1/64")
        self._addr(u.ns, u.ifname, f"{u.ipv4}/24", f"{u.ipv6}/64")
        _ip("-n", u.ns, "route", "add", "10.77.1.0/24", "via", "10.77.2.1")
        _ip("-n", u.ns, "-6", "route", "add", "fd77:1::/64", "via", "fd77:2::1")

    def down(self) -> None:
        for s in self._bridges:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the accept() of its relay thread
            s.close()
        self._bridges.clear()
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=3)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        self._procs.clear()
        for ns in reversed(self._made):
            # Anything still running inside a namespace we made is ours (started there by us).
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (OSError, ValueError):
                    pass
            for _ in range(20):
                p = subprocess.run(["ip", "netns", "delete", ns], capture_output=True, text=True)
                if p.returncode == 0 or "No such file" in p.stderr:
                    break
                time.sleep(0.1)
            else:
                print(f"netns: could not delete {ns}: {p.stderr.strip()}", file=sys.stderr)
        self._made.clear()
        for path in reversed(self._files):
            shutil.rmtree(path, ignore_errors=True)
        self._files.clear()

    def internet_behind_upstream(self) -> Host:
        """Two hops (resale): the upstream namespace becomes a second router, whose LAN is its
        eth0 (the router's WAN is one client on it), and a new namespace behind it is the internet:

            client -- [br-lan] router [wan 10.77.2.1] -- [eth0 10.77.2.2] upstream [wan 10.77.3.1]
                   -- [eth0 10.77.3.2] internet

        The router routes by default via the upstream and masquerades what leaves its WAN (as fw4
        does on OpenWrt), so the upstream sees one client; the upstream forwards to the internet."""
        inet = Host(f"{self.prefix}-i", "eth0", "10.77.3.2", "fd77:3::2")
        _ip("netns", "add", inet.ns)
        self._made.append(inet.ns)
        _ip("-n", inet.ns, "link", "set", "lo", "up")
        for ns in (self.upstream.ns, inet.ns):
            self.sysctl(ns, "net.ipv6.conf.all.accept_dad", 0)
        u, r = self.upstream, self.router
        self.sysctl(u.ns, "net.ipv4.ip_forward", 1)
        self.sysctl(u.ns, "net.ipv6.conf.all.forwarding", 1)
        self._veth(u.ns, self.WAN, inet.ns, inet.ifname)
        _ip("-n", u.ns, "link", "set", self.WAN, "up")
        _ip("-n", inet.ns, "link", "set", inet.ifname, "up")
        self._addr(u.ns, self.WAN, "10.77.3.1/24", "fd77:3::1/64")
        self._addr(inet.ns, inet.ifname, f"{inet.ipv4}/24", f"{inet.ipv6}/64")
        _ip("-n", inet.ns, "route", "add", "10.77.2.0/24", "via", "10.77.3.1")
        _ip("-n", inet.ns, "-6", "route", "add", "fd77:2::/64", "via", "fd77:3::1")
        _ip("-n", r.ns, "route", "add", "default", "via", u.ipv4)
        _ip("-n", r.ns, "-6", "route", "add", "default", "via", u.ipv6)
        run_in(r.ns, "nft", "-f", "-", input=(
            "table inet resale_nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat;\n"
            f"\t\toifname \"{self.WAN}\" masquerade\n\t}}\n}}\n"))
        self.internet = inet
        return inet

    # -- building blocks ------------------------------------------------------------------

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        extra = [] if self.gso else ["gso_max_segs", "1", "gso_max_size", "1500"]
        _ip("link", "add", name_a, "netns", ns_a, *extra, "type", "veth", "peer", "name", name_b, "netns", ns_b, *extra)

    @staticmethod
    def _addr(ns: str, dev: str, v4: str, v6: str) -> None:
        _ip("-n", ns, "addr", "add", v4, "dev", dev)
        _ip("-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad")

    @staticmethod
    def sysctl(ns: str, key: str, value: int | str) -> None:
        run_in(ns, "sysctl", "-qw", f"{key}={value}")

    def nft_argv(self, ns: str | None = None) -> list[str]:
        return ["ip", "netns", "exec", ns or self.router.ns, "nft"]

    # -- processes ------------------------------------------------------------------------

    def spawn(self, ns: str, *argv: str, ready: str | None = "READY", timeout: float = 10.0) -> subprocess.Popen:
        """Start a long-running process in `ns`; wait for it to print `ready` on stdout."""
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_ENV,
        )
        self._procs.append(p)
        if ready:
            deadline = time.monotonic() + timeout
            line = ""
            while ready not in line:
                line = p.stdout.readline()
                if not line and (p.poll() is not None or time.monotonic() > deadline):
                    raise RuntimeError(f"{argv!r} in {ns} did not start: {p.stderr.read()[:2000]}")
        return p

    def http_server(self, ns: str, body: str, ports: list[int]) -> subprocess.Popen:
        return self.spawn(ns, PYTHON, "-c", HTTP_SERVER, body, ",".join(map(str, ports)))

    def udp_echo(self, ns: str, ports: list[int]) -> subprocess.Popen:
        return self.spawn(ns, PYTHON, "-c", UDP_ECHO, ",".join(map(str, ports)))

    def dnsmasq(self, upstream: list[str], rebind_ok: tuple[str, ...] = (), extra: tuple[str, ...] = (),
                resolv_clients: bool = True) -> subprocess.Popen:
        """The owner's resolver in the router namespace, as OpenWrt 24.10 runs dnsmasq for the LAN:
        the options its init script renders from the default /etc/config/dhcp (bind-dynamic on
        every interface, local-service, cache 1000, EDNS 1232, rebind protection, the lan domain,
        DHCP on br-lan) and upstream servers from a resolv file, as the WAN's DHCP would leave them.
        `rebind_ok` are domains allowed to answer with private addresses (`list rebind_domain`).
        The router resolves through it (its resolv.conf: 127.0.0.1); with `resolv_clients`, so do
        the clients (their resolv.conf: the router's LAN addresses, what DHCP hands out). Ready
        when it answers on 127.0.0.1:53."""
        d = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-dnsmasq-"))
        self._files.append(d)
        d.chmod(0o755)  # dnsmasq reads its files as the dnsmasq user, after dropping root
        (d / "dnsmasq.d").mkdir()
        (d / "hosts").mkdir()
        (d / "resolv.conf.auto").write_text("".join(f"nameserver {a}\n" for a in upstream))
        (d / "dhcp.leases").touch()
        user = "dnsmasq" if _user_exists("dnsmasq") else "nobody"
        argv = [
            "dnsmasq", "--keep-in-foreground", "--pid-file=", "--log-facility=-",
            # what /etc/init.d/dnsmasq makes of OpenWrt's default /etc/config/dhcp:
            "--dhcp-authoritative", "--domain-needed", "--localise-queries", "--read-ethers",
            "--expand-hosts", "--bind-dynamic", "--local-service", "--bogus-priv", "--cache-size=1000",
            "--edns-packet-max=1232", "--domain=lan", "--local=/lan/", f"--addn-hosts={d / 'hosts'}",
            f"--dhcp-leasefile={d / 'dhcp.leases'}", f"--resolv-file={d / 'resolv.conf.auto'}",
            "--stop-dns-rebind", "--rebind-localhost-ok", *(f"--rebind-domain-ok=/{n}/" for n in rebind_ok),
            "--dhcp-broadcast=tag:needs-broadcast", f"--conf-dir={d / 'dnsmasq.d'}", f"--user={user}",
            "--dhcp-range=set:lan,10.77.1.100,10.77.1.249,255.255.255.0,12h", f"--no-dhcp-interface={self.WAN}",
            *extra,
        ]  # fmt: skip
        self._resolv_conf(self.router.ns, ["127.0.0.1"])
        if resolv_clients:
            for c in self.clients:
                self._resolv_conf(c.ns, [self.router.ipv4, self.router.ipv6])
        p = self.spawn(self.router.ns, *argv, ready=None)
        deadline = time.monotonic() + 10
        while not _dns_answers(self.router.ns, ("127.0.0.1", 53)):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start: {p.stderr.read()[:2000] if p.poll() is not None else ''}")
            time.sleep(0.05)
        return p

    def _resolv_conf(self, ns: str, servers: list[str]) -> None:
        """/etc/resolv.conf as programs in `ns` see it (`ip netns exec` mounts /etc/netns/<ns>/*)."""
        d = Path("/etc/netns") / ns
        d.mkdir(parents=True, exist_ok=True)
        if d not in self._files:
            self._files.append(d)
        (d / "resolv.conf").write_text("".join(f"nameserver {a}\n" for a in servers) + "options timeout:1\n")

    def call(self, ns: str, fn: str, *args, **kwargs):
        """Run CLIENT_LIB's `fn(*args, **kwargs)` inside `ns` and return its JSON result."""
        p = run_in(ns, PYTHON, "-c", CLIENT_LIB, fn, json.dumps(args), json.dumps(kwargs), timeout=120)
        return json.loads(p.stdout)

    # -- measuring ------------------------------------------------------------------------

    def install_counters(self, ns: str, counters: dict[str, str]) -> None:
        """Named byte counters in `ns`'s own `table inet probe`: {name: "match on input"}."""
        lines = ["table inet probe {"]
        lines += [f"\tcounter {name} {{\n\t\tpackets 0 bytes 0\n\t}}" for name in counters]
        lines += ["\tchain input {", "\t\ttype filter hook input priority filter; policy accept;"]
        lines += [f'\t\t{match} counter name "{name}"' for name, match in counters.items()]
        lines += ["\t}", "}"]
        run_in(ns, "nft", "-f", "-", input="\n".join(lines) + "\n")

    def read_counters(self, ns: str, field: str = "bytes") -> dict[str, int]:
        """{name: bytes} (or packets, with field="packets") of `install_counters`' counters."""
        p = run_in(ns, "nft", "-j", "list", "counters", "table", "inet", "probe")
        return {
            o["counter"]["name"]: int(o["counter"][field])
            for o in json.loads(p.stdout)["nftables"]
            if "counter" in o
        }

    def reset_counters(self, ns: str) -> None:
        run_in(ns, "nft", "reset", "counters", "table", "inet", "probe")

    # -- many clients in one namespace ----------------------------------------------------------

    def macvlan_clients(self, parent: Host, n: int, first: int = 50) -> list[Host]:
        """`n` more LAN devices inside `parent`'s namespace: macvlan interfaces (bridge mode) on
        its link `mv0`.. `mv{n-1}`, each with its own MAC 02:77:01:00:00:XX, IPv4 10.77.1.XX and
        IPv6 fd77:1::1:XX (XX = first + i, so first + n <= 255). To the router they are n
        separate devices on br-lan (ARP, NDP, MAC . IP in the gate); inside the namespace a socket
        bound to a device's address leaves through that device: one routing table per device
        selected by source address (`ip rule from ADDR`), and ARP answered only by the device
        that holds the address (arp_ignore=1, arp_announce=2; without them every macvlan would
        answer for every address and the router would learn random MACs)."""
        if first + n > 255:
            raise ValueError("10.77.1.0/24 holds devices up to .254: first + n must be at most 255")
        for key, value in (("arp_ignore", 1), ("arp_announce", 2), ("rp_filter", 0)):
            for scope in ("all", "default"):
                self.sysctl(parent.ns, f"net.ipv4.conf.{scope}.{key}", value)
        hosts, v4, v6 = [], [], []
        for i in range(n):
            x = first + i
            h = Host(parent.ns, f"mv{i}", f"10.77.1.{x}", f"fd77:1::1:{x:x}", f"02:77:01:00:00:{x:02x}")
            table = 1000 + x
            v4 += [f"link add {h.ifname} link {parent.ifname} address {h.mac} type macvlan mode bridge",
                   f"addr add {h.ipv4}/24 dev {h.ifname} noprefixroute",
                   f"link set {h.ifname} up",
                   f"rule add from {h.ipv4} lookup {table} pref {table}",
                   f"route add 10.77.1.0/24 dev {h.ifname} table {table}",
                   f"route add default via {self.router.ipv4} dev {h.ifname} table {table}"]
            v6 += [f"addr add {h.ipv6}/64 dev {h.ifname} nodad noprefixroute",
                   f"rule add from {h.ipv6} lookup {table} pref {table}",
                   f"route add fd77:1::/64 dev {h.ifname} table {table}",
                   f"route add default via {self.router.ipv6} dev {h.ifname} table {table}"]
            hosts.append(h)
        # One `ip -batch` per family (a batch line takes no -6): milliseconds for hundreds of devices.
        for family, lines in (("-4", v4), ("-6", v6)):
            p = subprocess.run(["ip", family, "-n", parent.ns, "-batch", "-"], input="\n".join(lines) + "\n",
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"macvlan clients in {parent.ns}: {p.stderr.strip()[:2000]}")
        return hosts

    # -- other devices ----------------------------------------------------------------------

    @contextlib.contextmanager
    def impersonating(self, spoofer: Host, ipv4: str) -> Iterator[None]:
        """`spoofer` takes `ipv4` (a paid client's address) with its own MAC; afterwards it
        gets its own addresses back and the router forgets what it learnt from it."""
        try:
            run_in(spoofer.ns, "ip", "addr", "flush", "dev", spoofer.ifname)
            run_in(spoofer.ns, "ip", "addr", "add", f"{ipv4}/24", "dev", spoofer.ifname)
            run_in(spoofer.ns, "ip", "route", "add", "default", "via", self.router.ipv4)
            yield
        finally:
            run_in(spoofer.ns, "ip", "addr", "flush", "dev", spoofer.ifname)
            run_in(spoofer.ns, "ip", "addr", "add", f"{spoofer.ipv4}/24", "dev", spoofer.ifname)
            run_in(spoofer.ns, "ip", "-6", "addr", "add", f"{spoofer.ipv6}/64", "dev", spoofer.ifname, "nodad")
            run_in(spoofer.ns, "ip", "route", "replace", "default", "via", self.router.ipv4)
            run_in(spoofer.ns, "ip", "-6", "route", "replace", "default", "via", self.router.ipv6)
            run_in(self.router.ns, "ip", "neigh", "flush", "dev", self.LAN)

    def bridge_tcp(self, ns: str, port: int, target: tuple[str, int]) -> None:
        """Serve 127.0.0.1:`port` inside `ns` by relaying to `target` as this process sees it
        (its own network namespace): e.g. a service in the router namespace reaching a bcoin
        node on this process's loopback. Ends with the topology."""
        listener = listen_in_netns(ns, ("127.0.0.1", port))
        self._bridges.append(listener)
        threading.Thread(target=_relay_accept, args=(listener, target), daemon=True).start()


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the calling thread inside network namespace `ns` (sockets it opens meanwhile live
    there for good), e.g. to reach a daemon listening on the router's 127.0.0.1."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(there, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(there)
        os.close(home)


def listen_in_netns(ns: str, addr: tuple[str, int]) -> socket.socket:
    """A TCP socket listening on `addr` inside namespace `ns`, made without leaving this
    process: the calling thread enters `ns` for the socket() call only."""
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(64)
    return s


def _relay_accept(listener: socket.socket, target: tuple[str, int]) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed by Topology.down()
        try:
            out = socket.create_connection(target, timeout=10)
        except OSError:
            conn.close()
            continue
        out.settimeout(None)
        for a, b in ((conn, out), (out, conn)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _dns_answers(ns: str, server: tuple[str, int], timeout: float = 0.2) -> bool:
    """Whether a DNS server in `ns` answers a query (for a name under .lan, answered locally)."""
    query = bytes.fromhex("abcd01000001000000000000") + b"\x05probe\x03lan\x00" + b"\x00\x01\x00\x01"
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(timeout)
        try:
            s.sendto(query, server)
            return s.recv(512)[:2] == b"\xab\xcd"
        except OSError:
            return False


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {p.stderr.strip()}")


def run_in(ns: str, *argv: str, input: str | None = None, timeout: float = 60.0, check: bool = True):
    p = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=input, capture_output=True, text=True, timeout=timeout, env=_ENV
    )
    if check and p.returncode != 0:
        raise RuntimeError(f"{argv[:3]!r} in {ns} failed ({p.returncode}): {p.stderr.strip()[:2000]}")
    return p
