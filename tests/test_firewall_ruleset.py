"""Rendering of `table inet bitmesh` (pure), Gate's batches against a fake nft, and an
`nft -c` syntax/kernel check of the rendered file in a scratch network namespace."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import replace

import pytest

from bitmesh.errors import BitMeshError, ConfigError
from bitmesh.firewall import ClientAddressError, FirewallConfig, FirewallError, Gate, PaidClient, UnknownClient
from bitmesh.firewall.gate import MAX_LEARNED, learned_ipv6, parse_state
from bitmesh.firewall.ruleset import dns_uncut, quota_name, render, render_delete

CFG = FirewallConfig(lan_interface="br-guest", router_ipv4="10.77.1.1", router_ipv6="fd77:1::1", portal_port=2050,
                     garden=(("198.51.100.7", 443), ("198.51.100.7", 80), ("2001:db8::7", 443)))
MAC = "02:77:00:00:00:01"


def rules(text: str) -> list[str]:
    """Rule lines (statements inside chains), without declarations and elements."""
    out, in_chain = [], False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("chain "):
            in_chain = True
        elif s == "}":
            in_chain = False
        elif in_chain and s and not s.startswith(("#", "type ")):
            out.append(s)
    return out


def chain(text: str, name: str) -> list[str]:
    """The rule lines of one chain."""
    body = text[text.index(f"\tchain {name} {{\n"):]
    return rules(body[: body.index("\n\t}\n") + 4])


def many(n: int) -> list[PaidClient]:
    return [PaidClient(f"02:55:00:00:{i // 256:02x}:{i % 256:02x}", ipv4=f"10.77.{100 + i // 200}.{i % 200 + 1}",
                       ipv6=(f"fd77:1::{i + 0x100:x}",), quota_bytes=10**9, expires_at=5000.0) for i in range(n)]


def test_atomic_replace_of_own_table_only():
    text = render(CFG)
    head = [line for line in text.splitlines() if line and not line.startswith("#")][:4]
    assert head == ["table inet bitmesh {", "}", "delete table inet bitmesh", "table inet bitmesh {"]
    statements = [line for line in text.splitlines() if not line.strip().startswith("#")]
    assert not [line for line in statements if "fw4" in line or "flush" in line]
    assert re.findall(r"^table ", text, re.M) == ["table ", "table "]
    assert render_delete() == "table inet bitmesh {\n}\ndelete table inet bitmesh\n"


def test_hooks_run_before_fw4():
    text = render(CFG)
    assert "type nat hook prerouting priority dstnat - 5;" in text
    assert "type filter hook forward priority filter - 5;" in text
    assert "type filter hook input priority filter - 5;" in text
    assert 'iifname "br-guest" jump captive' in text


def test_unpaid_policy():
    r = rules(render(CFG))
    assert "ether saddr . ip saddr != @paid4 tcp dport 80 dnat ip to 10.77.1.1:2050" in r
    assert "ether saddr . ip6 saddr != @paid6 tcp dport 80 dnat ip6 to [fd77:1::1]:2050" in r
    assert "tcp dport 2050 accept" in r
    # lan_up, lan_down and lan_local all end in drop; the only established accept is for the
    # router itself (replies towards the LAN are `ct direction reply`, see below).
    assert r.count("drop") >= 3
    assert [x for x in r if "established" in x] == ["ct state established,related accept"]


def test_walled_garden_is_host_and_port_limited_per_device_and_fails_closed():
    """Issue 10, item 4: no Bitcoin ports to any host; only listed address . port pairs (TCP and
    UDP); their HTTP is not redirected; buckets per device (MAC up, the flow's device down), and a
    full bucket or flow set drops (no `limit rate over ... drop` that a full set would skip)."""
    text = render(CFG)
    r = rules(text)
    assert "8333" not in text and "50002" not in text
    assert "set garden4 {\n\t\ttype ipv4_addr . inet_service\n\t\telements = {\n\t\t\t198.51.100.7 . 80,\n" \
           "\t\t\t198.51.100.7 . 443\n\t\t}" in text
    assert "set garden6 {\n\t\ttype ipv6_addr . inet_service\n\t\telements = {\n\t\t\t2001:db8::7 . 443\n" in text
    assert chain(text, "lan_up")[-3:] == ["meta l4proto { tcp, udp } ip daddr . th dport @garden4 goto garden_up",
                                          "meta l4proto { tcp, udp } ip6 daddr . th dport @garden6 goto garden_up",
                                          "drop"]
    # the captive redirect returns first for a listed host:port (HTTP to a garden host:80)
    cap = chain(text, "captive")
    assert cap[:2] == ["ip daddr . tcp dport @garden4 return", "ip6 daddr . tcp dport @garden6 return"]
    assert cap[2].startswith("ether saddr . ip saddr != @paid4 tcp dport 80 dnat")
    rate = "limit rate 64 kbytes/second burst 256 kbytes"
    assert chain(text, "garden_up") == [
        f"update @garden_up {{ ether saddr {rate} }} update @garden_flow {{ ct id : jhash ether saddr mod 4294967291 }}"
        " accept", "drop"]
    assert chain(text, "garden_down") == [
        f"meta mark set ct id map @garden_flow update @garden_down {{ meta mark {rate} }} accept", "drop"]
    assert chain(text, "lan_down")[-4:] == [
        "meta l4proto { tcp, udp } ip saddr . th sport @garden4 goto garden_down",
        "meta l4proto { tcp, udp } ip6 saddr . th sport @garden6 goto garden_down",
        "ct state related meta l4proto { icmp, ipv6-icmp } goto garden_down", "drop"]
    assert not [x for x in r if "garden" in x and "limit rate over" in x]
    assert "set garden_up {\n\t\ttype ether_addr\n\t\tsize 1024\n\t\tflags dynamic,timeout" in text
    assert "set garden_down {\n\t\ttypeof meta mark\n\t\tsize 1024\n" in text
    assert "map garden_flow {\n\t\ttypeof ct id : meta mark\n\t\tsize 8192\n" in text
    small = render(replace(CFG, garden_devices=4, garden_flows=16, garden=()))
    assert "size 4\n" in small and "size 16\n" in small and "elements" not in small.split("set garden4")[1][:60]


def test_only_replies_reach_the_lan_and_paid_devices_unknown_addresses_are_noted():
    """Issue 10, items 5 and 6: towards the LAN only `ct direction reply` (the client's own
    connections) reaches the counters; a paid MAC's ungranted IPv6 source is noted in seen6."""
    text = render(CFG)
    assert chain(text, "forward") == ['iifname "br-guest" jump lan_up',
                                      'oifname "br-guest" ct direction reply goto lan_down', 'oifname "br-guest" drop']
    assert chain(text, "lan_up")[4] == \
        "meta nfproto ipv6 ether saddr @paid_macs update @seen6 { ether saddr . ip6 saddr }"
    assert "set seen6 {\n\t\ttype ether_addr . ipv6_addr\n\t\tsize 256\n\t\tflags dynamic,timeout\n" in text
    # every paid device is in paid_macs, with its grant's timeout
    t = render(CFG, [PaidClient(MAC, ipv4="10.77.1.11", expires_at=110.0)], now=100.0)
    assert "set paid_macs {\n\t\ttype ether_addr\n\t\tflags timeout\n\t\telements = {\n\t\t\t" \
           f"{MAC} timeout 10000ms" in t


def test_counting_comes_before_any_accept_of_forwarded_traffic():
    r = rules(render(CFG))
    up = r[r.index("quota name ether saddr . ip saddr map @quota_up4 drop"):]
    assert up[:4] == [
        "quota name ether saddr . ip saddr map @quota_up4 drop",
        "quota name ether saddr . ip6 saddr map @quota_up6 drop",
        "ether saddr . ip saddr @paid4 accept",
        "ether saddr . ip6 saddr @paid6 accept",
    ]
    down = r[r.index("quota name ip daddr map @quota_down4 drop"):]
    assert down[:4] == [
        "quota name ip daddr map @quota_down4 drop",
        "quota name ip6 daddr map @quota_down6 drop",
        "ip daddr @down4 accept",
        "ip6 daddr @down6 accept",
    ]
    # Positive lookups of the counting sets happen once per forwarded packet (a lookup bumps
    # counters): in lan_up and lan_down only.
    text = render(CFG)
    fwd = rules(text[text.index("\tchain forward {"):text.index("\tchain garden_down {")])
    assert sum(1 for x in fwd if re.search(r"(?<!!= )@(paid|down)[46]\b", x)) == 4


def test_dns_of_devices_without_access_goes_to_the_captive_resolver_and_paid_dns_is_metered():
    """Issue 10, item 3: DNS to the router from a device without access (not granted its MAC .
    address pair, or noted over its quota in dns_cut) is dnat'ed to the captive resolver, which a
    per-device bucket guards (a full bucket set drops); the owner's resolver is for devices with
    access only and counts their DNS both ways, quota first; port 53 is no longer open to all."""
    text = render(CFG)
    assert 'iifname "br-guest" meta l4proto { tcp, udp } th dport 53 fib daddr type local jump captive_dns' \
        in chain(text, "prerouting")
    dnat4, dnat6 = "dnat ip to 10.77.1.1:2053", "dnat ip6 to [fd77:1::1]:2053"
    assert chain(text, "captive_dns") == [
        f"ether saddr @dns_cut meta nfproto ipv4 meta l4proto {{ tcp, udp }} {dnat4}",
        f"ether saddr @dns_cut meta nfproto ipv6 meta l4proto {{ tcp, udp }} {dnat6}",
        "ether saddr . ip6 saddr != @paid6 ether saddr @paid_macs update @seen6 { ether saddr . ip6 saddr }",
        f"ether saddr . ip saddr != @paid4 meta l4proto {{ tcp, udp }} {dnat4}",
        f"ether saddr . ip6 saddr != @paid6 meta l4proto {{ tcp, udp }} {dnat6}",
    ]
    # input: both DNS ports judged before lan_local's established accept; no open port 53
    assert chain(text, "input")[:2] == [
        'iifname "br-guest" meta l4proto { tcp, udp } th dport { 53, 2053 } jump lan_dns',
        'iifname "br-guest" jump lan_local']
    assert not [x for x in chain(text, "lan_local") if "53" in x]
    assert chain(text, "lan_dns") == [
        "th dport 2053 goto dns_captive",
        "quota name ether saddr . ip saddr map @quota_up4 goto dns_over",
        "quota name ether saddr . ip6 saddr map @quota_up6 goto dns_over",
        "ether saddr . ip saddr @paid4 accept",
        "ether saddr . ip6 saddr @paid6 accept",
        "drop"]
    assert chain(text, "dns_over") == ["update @dns_cut { ether saddr }", "drop"]
    assert chain(text, "dns_captive") == [
        "update @dns_meter { ether saddr limit rate over 20/second burst 60 packets } drop",
        "ether saddr != @dns_meter drop", "accept"]
    assert "set dns_meter {\n\t\ttype ether_addr\n\t\tsize 4096\n\t\tflags dynamic,timeout\n" in text
    # answers of the owner's resolver are download: quota, then the counting lookups
    assert chain(text, "lan_dns_out") == [
        "quota name ip daddr map @quota_down4 drop", "quota name ip6 daddr map @quota_down6 drop",
        "ip daddr @down4 accept", "ip6 daddr @down6 accept"]
    assert 'oifname "br-guest" meta l4proto { tcp, udp } th sport 53 goto lan_dns_out' in chain(text, "output")
    # no router IPv6 address: IPv6 DNS of the captive is not redirected (lan_dns drops it)
    v4only = render(replace(CFG, router_ipv6=None))
    assert "dnat ip6" not in v4only and dnat4 in v4only
    # a device paying again leaves dns_cut in one batch, present or not
    assert dns_uncut(MAC.upper()) == [f"add element inet bitmesh dns_cut {{ {MAC} }}",
                                      f"delete element inet bitmesh dns_cut {{ {MAC} }}"]


@pytest.mark.parametrize("port", [53, 2050, 0, 70000, True])
def test_captive_dns_port_must_be_free(port):
    with pytest.raises(ConfigError) as e:
        render(replace(CFG, captive_dns_port=port))
    assert "captive DNS port" in str(e.value) and e.value.code == "config_invalid"


def test_client_elements_carry_usage_and_time():
    c = PaidClient(MAC.upper(), ipv4="10.77.1.11", ipv6=("FD77:1:0::b",), quota_bytes=5000, expires_at=130.25,
                   used_up=100, used_down=2000)
    text = render(CFG, [c], now=100.0)
    assert "quota q_027700000001 {\n\t\tover 5000 bytes used 2100 bytes\n\t}" in text
    assert "02:77:00:00:00:01 . 10.77.1.11 counter packets 0 bytes 100 timeout 30250ms" in text
    assert "02:77:00:00:00:01 . fd77:1::b counter packets 0 bytes 0 timeout 30250ms" in text
    assert "10.77.1.11 counter packets 0 bytes 2000 timeout 30250ms" in text
    for m in ('02:77:00:00:00:01 . 10.77.1.11 : "q_027700000001"', '10.77.1.11 : "q_027700000001"',
              '02:77:00:00:00:01 . fd77:1::b : "q_027700000001"', 'fd77:1::b : "q_027700000001"'):
        assert m in text
    # No byte tariff: no quota object; no time tariff: no timeout; expired: no access at all.
    plain = render(CFG, [PaidClient(MAC, ipv4="10.77.1.11")], now=100.0)
    assert "quota q_" not in plain and not re.search(r"timeout \d+ms", plain)
    gone = render(CFG, [PaidClient(MAC, ipv4="10.77.1.11", expires_at=99.0)], now=100.0)
    assert "10.77.1.11" not in gone


def test_scale_is_sets_not_rules():
    assert rules(render(CFG, many(250), now=0.0)) == rules(render(CFG, [], now=0.0))


@pytest.mark.parametrize(
    "client",
    [
        PaidClient("02:77:00:00:00", ipv4="10.77.1.11"),
        PaidClient(MAC, ipv4="10.77.1.300"),
        PaidClient(MAC, ipv4="fd77::1"),
        PaidClient(MAC),
        PaidClient(MAC, ipv4="10.77.1.11", used_up=-1),
    ],
)
def test_bad_clients_are_refused(client):
    with pytest.raises(ClientAddressError) as e:
        render(CFG, [client])
    assert isinstance(e.value, BitMeshError) and e.value.code == "firewall_bad_client"


def test_an_address_cannot_belong_to_two_clients():
    with pytest.raises(ClientAddressError):
        render(CFG, [PaidClient(MAC, ipv4="10.77.1.11"), PaidClient("02:77:00:00:00:02", ipv4="10.77.1.11")])


@pytest.mark.parametrize(
    "change",
    [{"lan_interface": "br-lan; flush ruleset"}, {"router_ipv4": "10.77.1"}, {"router_ipv4": None, "router_ipv6": None},
     {"portal_port": 0}, {"garden": (("fd77::/64", 443),)}, {"garden": (("10.0.0.1", 0),)},
     {"garden": (("mempool.space", 443),)}, {"garden_rate_kbytes": 0}, {"garden_devices": 0}, {"garden_flows": -1}],
)
def test_bad_config_is_refused(change):
    with pytest.raises(ConfigError) as e:
        render(replace(CFG, **change))
    assert e.value.code == "config_invalid"


# -- Gate against a fake nft: what it sends, what it reads ------------------------------------


class FakeNft:
    def __init__(self, listing: list[dict] | None = None):
        self.loads: list[str] = []
        self.listing = listing or []

    def load(self, text: str) -> None:
        self.loads.append(text)

    def list_json(self, *what: str) -> list[dict]:
        return self.listing

    def table_exists(self, family: str, name: str) -> bool:
        return True


def listing(up: int, down: int, used: int, limit: int) -> list[dict]:
    # The shape `nft -j list table inet bitmesh` has in nft 1.0.6.
    return [
        {"quota": {"family": "inet", "name": quota_name(MAC), "table": "bitmesh", "bytes": limit, "used": used,
                   "inv": True}},
        {"set": {"name": "paid4", "elem": [{"elem": {"val": {"concat": [MAC, "10.77.1.11"]},
                                                      "counter": {"packets": 9, "bytes": up}}}]}},
        {"set": {"name": "down4", "elem": [{"elem": {"val": "10.77.1.11", "counter": {"packets": 9, "bytes": down}}}]}},
        {"map": {"name": "quota_up4", "map": "quota", "elem": [[{"concat": [MAC, "10.77.1.11"]}, quota_name(MAC)]]}},
        {"map": {"name": "quota_down4", "map": "quota", "elem": [["10.77.1.11", quota_name(MAC)]]}},
    ]


def test_parse_state():
    st = parse_state(listing(10, 20, 30, 40))
    assert st.up == {(MAC, "10.77.1.11"): 10} and st.down == {"10.77.1.11": 20}
    assert st.quotas == {quota_name(MAC): (40, 30)}
    assert st.maps == {"quota_up4": {(MAC, "10.77.1.11")}, "quota_down4": {"10.77.1.11"}}


def test_update_quota_carries_counted_bytes_in_one_batch():
    nft = FakeNft()
    g = Gate(CFG, nft, clock=lambda: 100.0)
    g.start([PaidClient(MAC, ipv4="10.77.1.11", quota_bytes=1000, used_up=50, used_down=60)])
    assert "over 1000 bytes used 110 bytes" in nft.loads[-1]
    nft.listing = listing(up=300, down=700, used=1400, limit=1000)  # over quota: drops were counted too
    assert g.usage()[MAC].exhausted
    g.update_quota(MAC, quota_bytes=5000)
    batch = nft.loads[-1]
    # Map entries go before the quota they reference; counted (accepted) bytes are the new `used`.
    assert batch.splitlines() == [
        f"delete element inet bitmesh quota_up4 {{ {MAC} . 10.77.1.11 }}",
        "delete element inet bitmesh quota_down4 { 10.77.1.11 }",
        f"delete quota inet bitmesh {quota_name(MAC)}",
        f"add quota inet bitmesh {quota_name(MAC)} {{ over 5000 bytes used 1000 bytes; }}",
        f'add element inet bitmesh quota_up4 {{ {MAC} . 10.77.1.11 : "{quota_name(MAC)}" }}',
        f'add element inet bitmesh quota_down4 {{ 10.77.1.11 : "{quota_name(MAC)}" }}',
        *dns_uncut(MAC),
    ]
    # A new expiry replaces the counting elements too, with their counters carried.
    g.update_quota(MAC, expires_at=160.0)
    batch = nft.loads[-1]
    assert f"paid4 {{ {MAC} . 10.77.1.11 counter packets 0 bytes 300 timeout 60000ms }}" in batch
    assert "add element inet bitmesh down4 { 10.77.1.11 counter packets 0 bytes 700 timeout 60000ms }" in batch
    assert batch.index("delete element inet bitmesh paid4") < batch.index("add element inet bitmesh paid4")


def test_usage_survives_expired_elements_and_revoke_deletes_only_what_exists():
    nft = FakeNft()
    g = Gate(CFG, nft, clock=lambda: 100.0)
    g.start([PaidClient(MAC, ipv4="10.77.1.11", expires_at=150.0)])
    nft.listing = listing(up=10, down=20, used=0, limit=0)[1:3]
    assert g.usage()[MAC].total == 30 and not g.usage()[MAC].expired
    nft.listing = []  # the elements timed out and were garbage-collected
    u = g.usage()[MAC]
    assert u.expired and (u.bytes_up, u.bytes_down) == (10, 20)
    final = g.revoke(MAC)
    assert final == u and nft.loads[-1].strip() == ""
    assert g.revoke(MAC) is None
    with pytest.raises(UnknownClient):
        g.update_quota(MAC, quota_bytes=1)


def test_allow_refuses_an_address_of_another_client():
    g = Gate(CFG, FakeNft(), clock=lambda: 0.0)
    g.start([PaidClient(MAC, ipv4="10.77.1.11")])
    with pytest.raises(ClientAddressError):
        g.allow(PaidClient("02:77:00:00:00:02", ipv4="10.77.1.11"))


def test_learned_ipv6_are_the_global_addresses_the_neighbour_table_binds_to_the_mac():
    """Issue 10, item 6 (pure part): which IPv6 addresses a paid device gets besides its own."""
    other = "02:77:00:00:00:02"
    table = {"fd77:1::b": MAC, "fd77:1::abcd": MAC, "fe80::1": MAC, "ff02::1": MAC, "fd77:1::c": other,
             "fd77:1::d": MAC}
    assert learned_ipv6(MAC, (), table, taken={"fd77:1::d"}) == ["fd77:1::abcd", "fd77:1::b"]
    # at most MAX_LEARNED, the ones already held first (a flood of new ones cannot push them out)
    flood = {f"fd77:1::f:{i:x}": MAC for i in range(100)}
    held = ("fd77:1::f:63",)
    got = learned_ipv6(MAC, held, flood, taken=set())
    assert len(got) == MAX_LEARNED and got[0] == "fd77:1::f:63"


def test_sync_addresses_grants_learned_addresses_bound_to_the_mac_and_takes_them_back():
    nft = FakeNft()
    g = Gate(CFG, nft, clock=lambda: 0.0)
    g.start([PaidClient(MAC, ipv4="10.77.1.11", quota_bytes=10**6), PaidClient("02:77:00:00:00:02",
                                                                              ipv4="10.77.1.12",
                                                                              ipv6=("fd77:1::c",))])
    nft.loads.clear()
    changed = g.sync_addresses([("10.77.1.11", MAC), ("fd77:1::b", MAC), ("fe80::1", MAC), ("fd77:1::c", MAC)])
    assert changed == [MAC]
    batch = nft.loads[-1]
    assert f"add element inet bitmesh paid6 {{ {MAC} . fd77:1::b" in batch
    assert f'add element inet bitmesh quota_up6 {{ {MAC} . fd77:1::b : "{quota_name(MAC)}" }}' in batch
    assert "fe80::1" not in batch and "fd77:1::c" not in batch  # link-local; another device's own
    assert g._clients[MAC].addresses == ("10.77.1.11", "fd77:1::b")
    nft.loads.clear()
    assert g.sync_addresses([("fd77:1::b", MAC)]) == []  # nothing changed: nothing written
    assert nft.loads == []
    assert g.sync_addresses([]) == [MAC]  # gone from the neighbour table: gone from the grant
    assert g._clients[MAC].addresses == ("10.77.1.11",)


# -- the kernel's own parser and validator -----------------------------------------------------


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")
def test_nft_accepts_the_rendered_table():
    from bitmesh.firewall import Nft

    ns = f"bmchk-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        nft = Nft(["ip", "netns", "exec", ns, "nft"])
        # a client whose counters passed its quota (they also count the packets it drops), as a
        # restart after a SIGKILL finds it: the old rendering made the whole load fail (EINVAL)
        over = PaidClient(MAC, ipv4="10.77.1.11", quota_bytes=5000, used_up=4000, used_down=2500)
        for text in (render(CFG), render(CFG, many(250), now=0.0), render_delete(), render(CFG, [over], now=0.0)):
            nft.check(text)
        with pytest.raises(FirewallError) as e:
            nft.check(render(CFG).replace("dnat ip to", "dnat ipx to"))
        assert e.value.code == "firewall_failed"
        nft.load(render(CFG, many(250), now=0.0))
        objs = nft.list_json("table", "inet", "bitmesh")
        assert len(parse_state(objs).up) == 500
        assert json.dumps(objs).count('"quota": {"family"') == 250
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=True)
