"""Who the portal thinks is asking, against the real `bitmesh serve` (firewall on) in a router
namespace, a real `bitmesh pay` in client 1, and other devices on the same LAN bridge:

- the caller is its socket's peer and the MAC the kernel has for it, never a header;
- acting on a channel (closing it, reading its session) takes the channel key's proof, so a
  device that takes a paid client's IP with its own MAC gets nothing of it;
- a real copy of both the MAC and the IP of a paid client (which nothing can stop on open Wi-Fi)
  is shown to the victim as concurrent use.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import pytest

from tests.support.netns import Host, Topology, run_in
from tests.support.router import Payer, RouterService, python_in

pytestmark = [
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

UP = "http://10.77.2.2:8080"
SINK = 9999  # upstream UDP port with no listener: arrivals are counted, never answered
PUBLIC_UNPAID = {"state": "unpaid", "bytes_remaining": None, "seconds_remaining": None}

# An HTTP request with any headers from inside a namespace; redirects are answered, not followed.
# With an interface name, the device first forgets its neighbours, so that its next packet asks
# the router's MAC and the router learns this device's (as any device that just took an address).
_REQUEST = r"""
import json, subprocess, sys, time, urllib.error, urllib.request
method, url, body, headers, announce = sys.argv[1:6]
class Keep(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), Keep)
for attempt in range(4):
    if announce:
        subprocess.run(["ip", "neigh", "flush", "dev", announce], check=True)
    req = urllib.request.Request(url, data=body.encode() or None, method=method, headers=json.loads(headers))
    try:
        with opener.open(req, timeout=5) as r:
            status, text = r.status, r.read().decode()
        break
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
        break
    except OSError as e:  # the connection itself (an address changing hands): try again
        status, text = 0, repr(e)
        time.sleep(0.3)
print(json.dumps([status, text]))
"""


def request(host: Host, method: str, url: str, body: str = "", headers: dict | None = None,
            announce: bool = False) -> tuple[int, object]:
    status, text = json.loads(python_in(host.ns, _REQUEST, method, url, body, json.dumps(headers or {}),
                                        host.ifname if announce else "").stdout)
    assert status, f"{method} {url} from {host.ns}: no answer ({text})"
    with contextlib.suppress(ValueError):
        return status, json.loads(text)
    return status, text


def http_ok(topo: Topology, host: Host, url: str) -> bool:
    return topo.call(host.ns, "http_get", url, timeout=2)["ok"]


def router_neighbour(topo: Topology, ip: str) -> str:
    out = run_in(topo.router.ns, "ip", "neigh", "show", ip).stdout.split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else ""


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=3) as t:
        t.bridge_tcp(t.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        t.http_server(t.upstream.ns, "UPSTREAM", [8080])
        c1 = t.clients[0]
        t.install_counters(t.upstream.ns, {"sink_c1ip": f"ip saddr {c1.ipv4} udp dport {SINK}"})
        yield t


@pytest.fixture
def service(topo, bcoin, tmp_path):
    s = RouterService(topo, bcoin, tmp_path / "router", {"prepay_step_sat": 2_000}).start()
    yield s
    s.stop()
    run_in(topo.router.ns, "ip", "neigh", "flush", "dev", topo.LAN)


@pytest.fixture
def payer(topo, service, faucet, tmp_path):
    """`bitmesh pay` in client 1: channel open, paid one step ahead, polling its session."""
    p = Payer(topo, topo.clients[0], service, faucet, 30_000, tmp_path / "payer", duration=600, interval=0.5)
    p.wait_for(r"^paid \d+ sat", timeout=60)
    yield p
    p.kill()


def test_a_forwarded_for_header_from_an_unpaid_device_changes_and_reads_nothing(topo, service, payer):
    c1, c2 = topo.clients[:2]
    cid = payer.channel_id
    assert http_ok(topo, c1, UP) and not http_ok(topo, c2, UP)
    spoof = {"X-Forwarded-For": c1.ipv4, "X-Real-IP": c1.ipv4, "Forwarded": f"for={c1.ipv4}"}
    # the portal answers client 2 about client 2, whatever its headers say
    assert request(c2, "GET", f"{service.url}/api/session", headers=spoof) == (200, PUBLIC_UNPAID)
    status, captive = request(c2, "GET", f"{service.url}/api/captive", headers=spoof)
    assert status == 200 and captive["captive"] is True
    assert request(c2, "GET", f"{service.url}/generate_204", headers=spoof)[0] == 302
    # ... and closes nothing (it knows the channel's id here: the attacker's best case)
    headers = {**spoof, "Content-Type": "application/json"}
    status, refused = request(c2, "POST", f"{service.url}/api/channels/{cid}/close", "{}", headers)
    assert (status, refused["error"]["code"]) == (403, "proof_missing")
    status, refused = request(c2, "GET", f"{service.url}/api/session?channel_id={cid}", headers=spoof)
    assert (status, refused["error"]["code"]) == (403, "proof_missing")
    # nothing changed: the channel is open, its client online, client 2 captive
    assert payer.session()["channel_state"] == "open"
    assert http_ok(topo, c1, UP) and not http_ok(topo, c2, UP)
    # the paid client itself, by its address: its device's public state, the rest by proof
    status, public = request(c1, "GET", f"{service.url}/api/session")
    assert status == 200 and public["state"] == "open" and set(public) == set(PUBLIC_UNPAID)


def test_a_device_that_takes_a_paid_clients_ip_can_neither_close_nor_read_its_session(topo, service, payer):
    c1, spoofer = topo.clients[0], topo.clients[2]
    cid = payer.channel_id
    paid = payer.session()["paid"]
    payer.kill()  # the client is quiet; its channel stays open and paid ahead
    with topo.impersonating(spoofer, c1.ipv4):
        # right after the client's last request (the portal once kept its MAC for 30 s)
        status, session = request(spoofer, "GET", f"{service.url}/api/session", announce=True)
        assert router_neighbour(topo, c1.ipv4) == spoofer.mac  # the kernel knows who is asking now
        assert (status, session) == (200, PUBLIC_UNPAID)  # another device: nothing of the client's
        for body, code in (("{}", "proof_missing"), ('{"proof": "3006020101020101"}', "proof_invalid")):
            status, refused = request(spoofer, "POST", f"{service.url}/api/channels/{cid}/close", body,
                                      {"Content-Type": "application/json"}, announce=True)
            assert (status, refused["error"]["code"]) == (403, code)
        status, refused = request(spoofer, "GET", f"{service.url}/api/session?channel_id={cid}&proof=00",
                                  announce=True)
        assert (status, refused["error"]["code"]) == (403, "proof_invalid")
        assert router_neighbour(topo, c1.ipv4) == spoofer.mac
        assert not http_ok(topo, spoofer, UP)  # and the firewall's grant is the client's MAC and IP
    session = payer.session()  # from the client again, with its proof
    assert session["channel_state"] == "open" and session["paid"] == paid
    assert http_ok(topo, c1, UP)


@contextlib.contextmanager
def cloned(topo: Topology, clone: Host, victim: Host):
    """`clone` takes both the MAC and the IP of `victim`, as an attacker on open Wi-Fi would. It is
    careful not to disturb the victim (it never resets the victim's TCP connections or answers
    for them), but answers ARP as any ordinary network stack does."""
    ns, dev = clone.ns, clone.ifname
    run_in(ns, "nft", "-f", "-", input="table inet clone {\n chain out {\n  type filter hook output priority 0;\n"
                                       "  tcp flags rst drop\n  meta l4proto { icmp, ipv6-icmp } drop\n }\n}\n")
    try:
        run_in(ns, "ip", "link", "set", dev, "down")
        run_in(ns, "ip", "link", "set", dev, "address", victim.mac)
        run_in(ns, "ip", "link", "set", dev, "up")
        run_in(ns, "ip", "addr", "flush", "dev", dev)
        run_in(ns, "ip", "addr", "add", f"{victim.ipv4}/24", "dev", dev)
        run_in(ns, "ip", "route", "replace", "default", "via", topo.router.ipv4)
        yield
    finally:
        run_in(ns, "ip", "link", "set", dev, "down")
        run_in(ns, "ip", "link", "set", dev, "address", clone.mac)
        run_in(ns, "ip", "link", "set", dev, "up")
        run_in(ns, "ip", "addr", "flush", "dev", dev)
        run_in(ns, "ip", "addr", "add", f"{clone.ipv4}/24", "dev", dev)
        run_in(ns, "ip", "-6", "addr", "add", f"{clone.ipv6}/64", "dev", dev, "nodad")
        run_in(ns, "ip", "route", "replace", "default", "via", topo.router.ipv4)
        run_in(ns, "ip", "-6", "route", "replace", "default", "via", topo.router.ipv6)
        run_in(ns, "nft", "delete", "table", "inet", "clone", check=False)
        run_in(topo.router.ns, "ip", "neigh", "flush", "dev", topo.LAN)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def test_a_mac_and_ip_clone_is_shown_to_the_victim_as_concurrent_use(topo, service, payer):
    """Nothing at the router tells two devices with one MAC and IP apart by their packets, and the
    clone does use the victim's credit. But both answer when the router asks who holds the
    address: the victim's session (and `bitmesh pay`) says so."""
    victim, clone = topo.clients[0], topo.clients[2]
    # the probe runs and sees one device: no false alarm for the client alone
    wait_for(lambda: (payer.session()["concurrent_use"] or {}).get("checked_at"), 30, "a first probe answered")
    first = payer.session()["concurrent_use"]
    assert (first["detected"], first["times"], first["first_seen"]) == (False, 0, None)

    topo.reset_counters(topo.upstream.ns)
    with cloned(topo, clone, victim):
        # the clone rides on the victim's grant: its datagrams leave for upstream, on the victim's bill
        sent = topo.call(clone.ns, "udp_probe", "10.77.2.2", SINK, n=20, timeout=0.05)["sent"]
        assert sent == 20
        assert topo.read_counters(topo.upstream.ns, "packets")["sink_c1ip"] > 0
        line = payer.wait_for(r"^concurrent use: 2 devices answered", timeout=40)
        assert "another device may be using your credit" in line.string
        use = wait_for(lambda: payer.session()["concurrent_use"]["detected"] and payer.session()["concurrent_use"],
                       20, "concurrent use in the session")
        assert use["most_answers"] == 2 and use["times"] >= 1 and use["first_seen"] <= use["last_seen"]
    # the sighting stays on the channel's record for its payer to see
    after = payer.session()
    assert after["concurrent_use"]["detected"] is True and after["channel_state"] == "open"
