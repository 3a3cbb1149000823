"""The captive resolver (bitmesh.firewall.captive_dns): its dnsmasq command line (pure) and the
supervisor with a real dnsmasq on a loopback port (restart after a crash, new garden names,
stop, no state of the owner's resolver read)."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

from bitmesh.firewall.captive_dns import CaptiveDns, CaptiveResolver, dnsmasq_argv, find_dnsmasq, garden_names
from bitmesh.firewall.ruleset import FirewallConfig
from tests.support import dns


def test_garden_names_are_the_host_names_only():
    assert garden_names(["Mempool.Space.", "10.0.0.1", "[::1]", "::1", "electrum.example", "bad name", ""]) == (
        "electrum.example", "mempool.space")


def test_dnsmasq_argv_answers_everything_with_the_router_and_forwards_only_garden_names():
    fw = FirewallConfig(lan_interface="br-lan", router_ipv4="10.77.1.1", router_ipv6="fd77:1::1")
    cfg = CaptiveDns.of(fw, ["mempool.space", "203.0.113.9"])
    argv = dnsmasq_argv("/usr/sbin/dnsmasq", cfg, "dnsmasq")
    assert argv[0] == "/usr/sbin/dnsmasq"
    assert "--conf-file=/dev/null" in argv and "--no-resolv" in argv and "--no-hosts" in argv
    assert "--cache-size=0" in argv and "--local-ttl=0" in argv and "--bind-interfaces" in argv
    assert [a for a in argv if a.startswith("--listen-address")] == ["--listen-address=10.77.1.1",
                                                                      "--listen-address=fd77:1::1"]
    assert "--port=2053" in argv and "--user=dnsmasq" in argv
    assert [a for a in argv if a.startswith("--address")] == ["--address=/#/10.77.1.1", "--address=/#/fd77:1::1"]
    # the only upstream: the owner's resolver, for the garden's names; no DHCP, no other server
    assert [a for a in argv if a.startswith("--server")] == ["--server=/mempool.space/127.0.0.1"]
    assert not [a for a in argv if "dhcp" in a]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answer(port: int, name: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        got = dns.resolve(name, server="127.0.0.1", port=port, timeout=0.2)
        if "error" not in got:
            return got["answers"]
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer on port {port}: {got}")


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(os.geteuid() != 0 or not find_dnsmasq() or not shutil.which("dnsmasq"),
                    reason="needs root and dnsmasq (dnsmasq-base)")
def test_resolver_is_supervised_restarted_updated_and_stopped():
    port = _free_udp_port()
    # answers with 127.0.0.1 for everything; "garden.test" forwarded to a port nobody answers
    resolver = CaptiveResolver(CaptiveDns(("127.0.0.1",), port))
    resolver.start()
    try:
        assert _answer(port, "anything.example") == ["127.0.0.1"]
        first = resolver.pid
        assert first is not None and resolver.starts == 1
        os.kill(first, 9)  # a crash: up again after the 1 s back-off
        assert _gone(first)
        time.sleep(0.2)
        assert _answer(port, "again.example") == ["127.0.0.1"]
        assert resolver.pid not in (None, first) and resolver.starts == 2
        # a new walled garden: restarted at once with it; a same config changes nothing
        second = resolver.pid
        assert second is not None
        resolver.update(CaptiveDns(("127.0.0.1",), port, ("garden.test",), upstream="127.0.0.1#9"))
        assert _gone(second)
        deadline = time.monotonic() + 5
        while resolver.starts < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        got = dns.resolve("www.garden.test", server="127.0.0.1", port=port, timeout=2.0)
        assert got.get("answers", []) != ["127.0.0.1"]  # forwarded (no answer there), not captive
        assert _answer(port, "other.example") == ["127.0.0.1"]
        third = resolver.pid
        resolver.update(CaptiveDns(("127.0.0.1",), port, ("garden.test",), upstream="127.0.0.1#9"))
        assert resolver.pid == third and resolver.starts == 3
    finally:
        pid = resolver.pid
        resolver.stop()
    assert pid is not None and _gone(pid)
    assert "error" in dns.resolve("x.example", server="127.0.0.1", port=port, timeout=0.3)
