"""The captive resolver: the DNS a client without access gets.

A name is a channel. The owner's resolver (dnsmasq, as OpenWrt runs it) forwards whatever name a
client asks for, so a client that puts data into long names under a zone it controls and reads
data out of the answers (iodine, dnscat) moves hundreds of kB/s through the router unpaid. So the
gate sends the DNS of every client without access (unpaid, expired, revoked, over its quota) to
this second dnsmasq, which the service runs beside the owner's on the router's LAN addresses
(`captive_dns_port`, 2053; the gate's dnat puts it on port 53 for the client). It

* answers every name with the router's own LAN address (A and AAAA, TTL 0): the OS's captive
  probes and any page the user opens land on the portal (HTTP to the router is the portal);
* forwards the walled garden's names, and only those, to the owner's resolver (127.0.0.1), so a
  wallet reaches its garden hosts by name;
* sends nothing else anywhere: no name a client makes up leaves the router, so nothing can be
  carried out through it or back.

The owner's dnsmasq and its configuration are not touched: clients with access and the router
itself keep using it. This one needs no file on flash: its whole configuration is its command line
(`--conf-file=/dev/null`: the owner's /etc/dnsmasq.conf is not read). Any dnsmasq build serves
(OpenWrt's `dnsmasq`, `dnsmasq-full`, Debian's `dnsmasq-base`).

`dnsmasq_argv` is pure; `CaptiveResolver` runs it in a supervisor thread, restarts it if it
exits, and ends it with the service (also on SIGKILL: it is started with a parent-death signal).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import pwd
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from bitmesh.firewall.ruleset import FirewallConfig

log = logging.getLogger(__name__)

OWNER_RESOLVER = "127.0.0.1"  # the owner's dnsmasq: OpenWrt's own /etc/resolv.conf points there
_BINARIES = ("/usr/sbin/dnsmasq", "/usr/bin/dnsmasq")


@dataclass(frozen=True)
class CaptiveDns:
    """What the captive resolver serves: where it listens, what it answers, what it forwards."""

    addresses: tuple[str, ...]  # the router's LAN addresses (also the answer to every name)
    port: int
    garden_names: tuple[str, ...] = ()  # forwarded to the owner's resolver, with their subdomains
    upstream: str = OWNER_RESOLVER

    @classmethod
    def of(cls, firewall: FirewallConfig, garden_hosts: Iterable[str] = ()) -> CaptiveDns:
        addrs = tuple(a for a in (firewall.router_ipv4, firewall.router_ipv6) if a)
        return cls(addrs, firewall.captive_dns_port, garden_names(garden_hosts))


def garden_names(hosts: Iterable[str]) -> tuple[str, ...]:
    """The host names among walled-garden hosts (addresses need no DNS), lower case, sorted."""
    out = set()
    for host in hosts:
        host = str(host).strip().lower().rstrip(".")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host and all(ch.isalnum() or ch in "-." for ch in host):  # config.py checked them
                out.add(host)
    return tuple(sorted(out))


def dnsmasq_argv(binary: str, cfg: CaptiveDns, user: str | None = None) -> list[str]:
    argv = [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",  # never the owner's /etc/dnsmasq.conf
        "--pid-file=",
        "--log-facility=-",  # stderr: the service logs it
        f"--port={cfg.port}",
        "--bind-interfaces",
        *(f"--listen-address={a}" for a in cfg.addresses),
        "--no-resolv",
        "--no-hosts",
        "--cache-size=0",  # the owner's resolver caches; answers here are made on the spot
        "--local-ttl=0",  # so nothing keeps the portal's address once the client has access
        "--edns-packet-max=1232",
        *(f"--address=/#/{a}" for a in cfg.addresses),
        *(f"--server=/{name}/{cfg.upstream}" for name in cfg.garden_names),
    ]
    if user:
        argv.append(f"--user={user}")
    return argv


def find_dnsmasq() -> str | None:
    return shutil.which("dnsmasq") or next((b for b in _BINARIES if shutil.which(b)), None)


def _unprivileged_user() -> str | None:
    """The user dnsmasq drops root for: OpenWrt's and Debian's packages make `dnsmasq`."""
    for name in ("dnsmasq", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls it
except OSError:  # pragma: no cover - no libc to speak of
    _libc = None


def _die_with_parent() -> None:
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class CaptiveResolver:
    """dnsmasq with `dnsmasq_argv(cfg)`, kept running: restarted after 1 s if it exits (doubling
    up to 30 s while it keeps failing), restarted at once with a new configuration by `update`,
    ended by `stop` (and by the kernel if the service dies: the signal goes to it when the thread
    that started it ends, and that thread lives as long as the resolver should)."""

    def __init__(self, cfg: CaptiveDns, binary: str | None = None):
        self.cfg = cfg
        self.binary = binary or find_dnsmasq()
        self.user = _unprivileged_user()
        self.starts = 0
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and p.poll() is None else None

    def start(self) -> None:
        if self.binary is None:
            log.error("captive DNS not started: no dnsmasq found; clients without access get no DNS "
                      "(the gate sends their port 53 to port %d)", self.cfg.port)
            return
        self._thread = threading.Thread(target=self._run, name="captive-dns", daemon=True)
        self._thread.start()

    def update(self, cfg: CaptiveDns) -> None:
        """Take a new configuration (walled-garden names, addresses): dnsmasq is restarted with it."""
        with self._lock:
            if cfg == self.cfg:
                return
            self.cfg = cfg
            self._changed.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            with self._lock:
                self._changed.clear()
                argv = dnsmasq_argv(self.binary, self.cfg, self.user)
                try:
                    self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.PIPE, text=True, errors="replace",
                                                  preexec_fn=_die_with_parent, close_fds=True)
                except OSError as e:
                    log.error("captive DNS: %s did not start: %s", self.binary, e)
                    self._proc = None
                proc = self._proc
            if proc is None:
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)
                continue
            self.starts += 1
            started = time.monotonic()
            assert proc.stderr is not None
            for line in proc.stderr:  # until it exits
                log.info("captive DNS: %s", line.rstrip())
            code = proc.wait()
            if self._stop.is_set():
                return
            if self._changed.is_set():
                backoff = 1.0
                continue  # restarted for a new configuration
            if time.monotonic() - started > 10:
                backoff = 1.0
            log.error("captive DNS: dnsmasq exited (%s); started again in %.0f s", code, backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 30.0)
