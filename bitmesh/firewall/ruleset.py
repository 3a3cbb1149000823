"""Render the whole `table inet bitmesh` as nft text. Pure: no I/O, no clock (callers pass `now`).

Design (see docs in DESIGN.md, "Firewall and metering"):

* One table, `inet bitmesh`, covering IPv4 and IPv6. fw4's tables (`inet fw4`) are never named
  here. Our base chains hook *before* fw4's chains of the same hook (priority - 5) so that our
  `drop` is final (a drop in any base chain ends the packet) while our `accept` only ends *our*
  evaluation: fw4 still sees every packet we accept and can still refuse it. The two coexist.
* Paid clients live in sets and maps with O(1) lookups (hash), never a rule per client:
    - `paid4`/`paid6`  (ether_addr . ipX_addr, per-element counter, optional timeout): upload
      counting and the MAC+IP binding, matched on LAN ingress (forward, iifname LAN).
    - `down4`/`down6`  (ipX_addr, per-element counter, optional timeout): download counting,
      matched on egress towards the LAN by destination address (the MAC of the next hop is not
      known in forward; a spoofer cannot open flows because its upload never matches `paid*`).
    - `quota_up4/6`, `quota_down4/6` (objref maps -> `quota` objects `q_<mac>`): one named quota
      object per byte-tariff client, shared by both directions and both address families, so the
      byte quota counts upload + download together. The quota rule runs first and drops once the
      object is over its limit: the kernel cuts the client off at the packet that would cross the
      quota, whatever the poll interval of the service.
    - Time tariffs: element `timeout` on `paid*`/`down*`; when it elapses the lookup fails at the
      next packet (jiffy precision), the client falls back to the unpaid rules.
* Counting happens BEFORE any established/related accept (this table has none for paid
  traffic; fw4's comes later at priority filter), so every packet of a paid flow is counted.
  A lookup in a set with counters bumps the element counter, so every other use of `paid4/6`
  is a negated lookup (`!= @paid4`), which never touches counters.
* Towards the LAN only what answers a connection a LAN client opened passes (`ct direction
  reply`: replies and ICMP errors about the client's own flows); anything else (a flood at a
  closed port, a scan) is dropped before any counter sees it, so it is never billed.
* A paid device's other IPv6 addresses (SLAAC, privacy addresses) are granted with its own:
  a packet from a paid MAC with a source address not granted yet is noted in `seen6`; the
  service checks the address in the kernel's neighbour table (it must answer from that MAC)
  and adds it to the device's grant, and removes it when the table no longer holds it.
* DNS (docs/security.md, "DNS tunnels"): a client without access (unpaid, expired, revoked, or
  cut off by its byte quota: `dns_cut`) has its DNS to the router sent to the captive resolver
  (dnat to `captive_dns_port`; bitmesh.firewall.captive_dns), which answers every name with the
  portal and forwards only walled-garden names: none of its names reaches the outside. The
  owner's resolver (port 53) serves clients with access only, and their DNS is metered like
  forwarded traffic (quota, then the counting lookups, both directions).
* Unpaid clients: DHCP, DNS and the portal on the router itself (input chain), HTTP redirected
  to the portal (dnat in prerouting), the walled garden (configured host:port pairs, TCP and
  UDP; nothing else of those hosts, and HTTP to a listed host:80 is not redirected) rate
  limited per device, and nothing else, IPv6 included. The garden's token buckets are keyed
  by MAC (upload) and by the device of the connection (download: a conntrack id -> device map
  filled by the upload side), so extra source addresses buy nothing; every bucket set has a
  size and a full one fails closed (a device or flow that finds no room gets no garden).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from bitmesh.errors import BitMeshError, ConfigError

TABLE = "bitmesh"
FAMILY = "inet"

# Hook priorities. fw4 uses the standard ones (dstnat = -100, filter = 0); ours run just before.
PRIO_DSTNAT = "dstnat - 5"  # our captive redirect wins over fw4's port forwards for LAN HTTP
PRIO_FILTER = "filter - 5"  # our drops are final before fw4's `ct state established accept`

SEEN_SIZE = 256  # unknown source addresses of paid devices noted at once (full: noted later)

# The captive resolver (DNS for clients without access): its port, and the per-device rate of
# packets to it (a page load with the OS's probes is a few dozen queries).
CAPTIVE_DNS_PORT = 2053
CAPTIVE_DNS_RATE = "20/second burst 60 packets"
CAPTIVE_DNS_DEVICES = 4096  # devices with a DNS bucket at once (full: new devices get no DNS)
DNS_CUT_SIZE = 65535  # paid devices over their quota at once (only paid MACs get in)

_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class FirewallError(BitMeshError):
    """The firewall could not be changed or read."""

    code = "firewall_failed"
    http_status = 500


class ClientAddressError(FirewallError):
    """A paid client's MAC or IP address is invalid or already bound to another client."""

    code = "firewall_bad_client"
    http_status = 400


class UnknownClient(FirewallError):
    """No paid client with this MAC address."""

    code = "firewall_unknown_client"
    http_status = 404


@dataclass(frozen=True)
class FirewallConfig:
    """What the gate needs to know about the router. Addresses are the router's own on the LAN."""

    lan_interface: str = "br-lan"
    router_ipv4: str | None = "192.168.1.1"
    router_ipv6: str | None = None
    portal_port: int = 2050
    dns_port: int = 53
    garden: tuple[tuple[str, int], ...] = ()  # (IPv4 or IPv6 address, port) unpaid clients reach
    garden_rate_kbytes: int = 64  # per unpaid device and direction, kbytes/second
    garden_burst_kbytes: int = 256
    garden_devices: int = 1024  # devices with a garden bucket at once (full: new devices get none)
    garden_flows: int = 8192  # garden connections followed at once (full: new ones get none)
    captive_dns_port: int = CAPTIVE_DNS_PORT  # the captive resolver, on the router's LAN addresses

    def validate(self) -> None:
        if not _IFNAME.match(self.lan_interface):
            raise ConfigError(f"invalid LAN interface name: {self.lan_interface!r}")
        if self.router_ipv4 is None and self.router_ipv6 is None:
            raise ConfigError("the router needs an IPv4 or an IPv6 LAN address")
        if self.router_ipv4 is not None:
            _addr(self.router_ipv4, 4, ConfigError)
        if self.router_ipv6 is not None:
            _addr(self.router_ipv6, 6, ConfigError)
        for port in (self.portal_port, self.dns_port, *(p for _, p in self.garden)):
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise ConfigError(f"invalid port: {port!r}")
        for addr, _port in self.garden:
            _garden_addr(addr)
        for n in (self.garden_rate_kbytes, self.garden_burst_kbytes, self.garden_devices, self.garden_flows):
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ConfigError(f"invalid walled-garden rate or size: {n!r}")
        _check_dns_ports(self)

    def garden_elements(self, version: int) -> list[str]:
        """`address . port` elements of the garden set of one address family, sorted."""
        pairs = {(ipaddress.ip_address(_garden_addr(a)), p) for a, p in self.garden}
        return [f"{a} . {p}" for a, p in sorted(x for x in pairs if x[0].version == version)]


@dataclass(frozen=True)
class PaidClient:
    """A client with access. `quota_bytes` is the total allowance (upload + download, since the
    session began, so it includes `used_up + used_down`); None means no byte limit.
    `expires_at` is a unix time; None means no time limit. `used_*` are bytes already counted
    (from the ledger), carried into the kernel counters and quota object."""

    mac: str
    ipv4: str | None = None
    ipv6: tuple[str, ...] = ()
    quota_bytes: int | None = None
    expires_at: float | None = None
    used_up: int = 0
    used_down: int = 0

    def normalized(self) -> PaidClient:
        mac = normalize_mac(self.mac)
        ipv4 = _addr(self.ipv4, 4, ClientAddressError) if self.ipv4 is not None else None
        ipv6s = self.ipv6
        if isinstance(ipv6s, str):
            ipv6s = (ipv6s,)
        ipv6 = tuple(dict.fromkeys(_addr(a, 6, ClientAddressError) for a in ipv6s))
        if ipv4 is None and not ipv6:
            raise ClientAddressError(f"client {mac} has no IP address")
        for n in (self.used_up, self.used_down, self.quota_bytes or 0):
            if not isinstance(n, int) or n < 0:
                raise ClientAddressError(f"client {mac}: byte counts must be non-negative integers")
        return PaidClient(mac, ipv4, ipv6, self.quota_bytes, self.expires_at, self.used_up, self.used_down)

    @property
    def used(self) -> int:
        return self.used_up + self.used_down

    @property
    def addresses(self) -> tuple[str, ...]:
        return ((self.ipv4,) if self.ipv4 else ()) + self.ipv6


def normalize_mac(mac: str) -> str:
    m = str(mac).strip().lower().replace("-", ":")
    if not _MAC.match(m):
        raise ClientAddressError(f"invalid MAC address: {mac!r}")
    return m


def quota_name(mac: str) -> str:
    return "q_" + normalize_mac(mac).replace(":", "")


def _addr(text: str, version: int, err: type[BitMeshError]) -> str:
    try:
        a = ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise err(f"invalid IPv{version} address: {text!r}") from None
    if a.version != version:
        raise err(f"not an IPv{version} address: {text!r}")
    return str(a)


def _garden_addr(text: str) -> str:
    try:
        return str(ipaddress.ip_address(str(text).strip()))
    except ValueError:
        raise ConfigError(f"invalid walled-garden address: {text!r}") from None


def check_clients(clients: Iterable[PaidClient]) -> list[PaidClient]:
    """Normalize clients; refuse duplicate MACs and addresses bound to two MACs."""
    out: dict[str, PaidClient] = {}
    owner: dict[str, str] = {}
    for c in clients:
        c = c.normalized()
        if c.mac in out:
            raise ClientAddressError(f"client {c.mac} given twice")
        for a in c.addresses:
            if a in owner:
                raise ClientAddressError(f"address {a} is bound to {owner[a]} and {c.mac}")
            owner[a] = c.mac
        out[c.mac] = c
    return list(out.values())


def timeout_ms(client: PaidClient, now: float) -> int | None:
    """Milliseconds left for a time-tariff client (None: no time limit; <= 0: already expired)."""
    if client.expires_at is None:
        return None
    return math.ceil((client.expires_at - now) * 1000)


# ---------------------------------------------------------------------------------------------
# Element text. Shared by the full render and by Gate's incremental batches.


def _tmo(ms: int | None) -> str:
    return f" timeout {ms}ms" if ms is not None else ""


def _ctr(nbytes: int) -> str:
    return f" counter packets 0 bytes {int(nbytes)}"


@dataclass
class ClientElements:
    """The elements and objects one client needs, as nft element text per set/map."""

    sets: dict[str, list[str]] = field(default_factory=dict)
    quota: str | None = None  # quota object body, e.g. "over 1000 bytes used 10 bytes"

    def add(self, name: str, text: str) -> None:
        self.sets.setdefault(name, []).append(text)


def address_elements(el: ClientElements, client: PaidClient, address: str, ms: int | None, up: int = 0,
                     down: int = 0, counting: bool = True, quota: bool = True) -> None:
    """One address's elements: its counting elements (`paid*` bound to the MAC, `down*`, with
    `up`/`down` bytes already counted) and, under a byte tariff, its entries in the quota maps."""
    v = 6 if ":" in address else 4
    if counting:
        el.add(f"paid{v}", f"{client.mac} . {address}{_ctr(up)}{_tmo(ms)}")
        el.add(f"down{v}", f"{address}{_ctr(down)}{_tmo(ms)}")
    if quota and client.quota_bytes is not None:
        qn = quota_name(client.mac)
        el.add(f"quota_up{v}", f'{client.mac} . {address} : "{qn}"')
        el.add(f"quota_down{v}", f'{address} : "{qn}"')


def client_elements(client: PaidClient, now: float) -> ClientElements:
    """Elements for one (normalized) client. Used bytes go on the first element of each direction."""
    ms = timeout_ms(client, now)
    el = ClientElements()
    if ms is not None and ms <= 0:
        return el  # expired: no access at all
    if client.quota_bytes is not None:
        # The element counters sit before the quota and also count the packets it drops, so the
        # bytes counted can pass the limit; the kernel refuses a quota used beyond its limit
        # (EINVAL), and one used up to it is just as exhausted.
        limit = int(client.quota_bytes)
        el.quota = f"over {limit} bytes used {min(client.used, limit)} bytes"
    el.add("paid_macs", f"{client.mac}{_tmo(ms)}")
    up_left, down_left = client.used_up, client.used_down
    for a in client.addresses:
        address_elements(el, client, a, ms, up_left, down_left)
        up_left = down_left = 0
    return el


# name -> (declaration lines without elements)
SET_DECLS: dict[str, str] = {
    "paid4": "type ether_addr . ipv4_addr\n\t\tflags timeout\n\t\tcounter",
    "paid6": "type ether_addr . ipv6_addr\n\t\tflags timeout\n\t\tcounter",
    "down4": "type ipv4_addr\n\t\tflags timeout\n\t\tcounter",
    "down6": "type ipv6_addr\n\t\tflags timeout\n\t\tcounter",
    "paid_macs": "type ether_addr\n\t\tflags timeout",  # every paid device (no counter)
}
MAP_DECLS: dict[str, str] = {
    "quota_up4": "type ether_addr . ipv4_addr : quota",
    "quota_up6": "type ether_addr . ipv6_addr : quota",
    "quota_down4": "type ipv4_addr : quota",
    "quota_down6": "type ipv6_addr : quota",
}


def _elements(items: list[str]) -> str:
    if not items:
        return ""
    return "\n\t\telements = {\n\t\t\t" + ",\n\t\t\t".join(items) + "\n\t\t}"


def render(config: FirewallConfig, clients: Iterable[PaidClient] = (), now: float = 0.0) -> str:
    """The whole table as one atomic `nft -f` file: create-if-missing, delete, define.

    Loading it replaces any previous `table inet bitmesh` in one transaction (no window where
    the old rules are gone and the new ones not yet in place), and touches nothing else.
    """
    config.validate()
    clients = check_clients(clients)
    lan = config.lan_interface
    elems: dict[str, list[str]] = {n: [] for n in (*SET_DECLS, *MAP_DECLS)}
    quotas: list[tuple[str, str]] = []
    for c in clients:
        el = client_elements(c, now)
        for name, items in el.sets.items():
            elems[name].extend(items)
        if el.quota:
            quotas.append((quota_name(c.mac), el.quota))

    rate = f"{config.garden_rate_kbytes} kbytes/second burst {config.garden_burst_kbytes} kbytes"
    g4, g6 = config.garden_elements(4), config.garden_elements(6)

    out: list[str] = [
        "# Generated by bitmesh.firewall.ruleset; loaded atomically with `nft -f`. Do not edit.",
        f"table {FAMILY} {TABLE} {{\n}}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
    ]
    for name, body in quotas:
        out.append(f"\tquota {name} {{\n\t\t{body}\n\t}}")
    for name, decl in SET_DECLS.items():
        out.append(f"\tset {name} {{\n\t\t{decl}{_elements(elems[name])}\n\t}}")
    for name, decl in MAP_DECLS.items():
        out.append(f"\tmap {name} {{\n\t\t{decl}{_elements(elems[name])}\n\t}}")
    # A paid device's source addresses not granted yet, for the service to check and grant.
    out.append(f"\tset seen6 {{\n\t\ttype ether_addr . ipv6_addr\n\t\tsize {SEEN_SIZE}"
               "\n\t\tflags dynamic,timeout\n\t\ttimeout 30s\n\t}")
    out.extend(_dns_sets())
    out.append(f"\tset garden4 {{\n\t\ttype ipv4_addr . inet_service{_elements(g4)}\n\t}}")
    out.append(f"\tset garden6 {{\n\t\ttype ipv6_addr . inet_service{_elements(g6)}\n\t}}")
    # The walled garden's token buckets, made by the packet path: per device (MAC) upload; per
    # device download through garden_flow (conntrack id -> a 32-bit hash of the device's MAC,
    # written by the upload side), as the MAC a reply goes to is not known in forward.
    dyn = "flags dynamic,timeout"
    out.append(f"\tmap garden_flow {{\n\t\ttypeof ct id : meta mark\n\t\tsize {config.garden_flows}"
               f"\n\t\t{dyn}\n\t\ttimeout 2m\n\t}}")
    out.append(f"\tset garden_up {{\n\t\ttype ether_addr\n\t\tsize {config.garden_devices}"
               f"\n\t\t{dyn}\n\t\ttimeout 1m\n\t}}")
    out.append(f"\tset garden_down {{\n\t\ttypeof meta mark\n\t\tsize {config.garden_devices}"
               f"\n\t\t{dyn}\n\t\ttimeout 1m\n\t}}")

    # A listed garden host:port is never redirected (HTTP to a garden host:80 reaches it).
    redirect = ["\t\tip daddr . tcp dport @garden4 return", "\t\tip6 daddr . tcp dport @garden6 return"]
    if config.router_ipv4:
        redirect.append(
            f"\t\tether saddr . ip saddr != @paid4 tcp dport 80 dnat ip to {config.router_ipv4}:{config.portal_port}"
        )
    if config.router_ipv6:
        redirect.append(
            f"\t\tether saddr . ip6 saddr != @paid6 tcp dport 80"
            f" dnat ip6 to [{config.router_ipv6}]:{config.portal_port}"
        )
    out.append(
        "\n".join(
            [
                "\tchain prerouting {",
                "\t\t# dstnat - 5: before fw4's dstnat chain; the first NAT binding of a flow wins, so",
                "\t\t# an unpaid client's HTTP always lands on the portal. Negated lookups: no counting.",
                f"\t\ttype nat hook prerouting priority {PRIO_DSTNAT}; policy accept;",
                f'\t\tiifname "{lan}" jump captive',
                f'\t\tiifname "{lan}" meta l4proto {{ tcp, udp }} th dport {config.dns_port}'
                " fib daddr type local jump captive_dns",
                "\t}",
                "\tchain captive {",
                *redirect,
                "\t}",
                *_dns_redirect_chain(config),
            ]
        )
    )
    out.append(
        "\n".join(
            [
                "\tchain input {",
                "\t\t# filter - 5: our drop is final before fw4 runs; our accept still passes through fw4.",
                f"\t\ttype filter hook input priority {PRIO_FILTER}; policy accept;",
                f'\t\tiifname "{lan}" meta l4proto {{ tcp, udp }}'
                f" th dport {{ {config.dns_port}, {config.captive_dns_port} }} jump lan_dns",
                f'\t\tiifname "{lan}" jump lan_local',
                "\t}",
                *_dns_input_chains(config),
                "\tchain lan_local {",
                "\t\t# What every LAN client (paid or not) may reach on the router itself.",
                "\t\tct state established,related accept",
                "\t\tmeta l4proto { icmp, ipv6-icmp } accept",
                "\t\tudp dport { 67, 547 } accept",
                f"\t\ttcp dport {config.portal_port} accept",
                "\t\tdrop",
                "\t}",
            ]
        )
    )
    garden_limit = f"limit rate {rate}"
    out.append(
        "\n".join(
            [
                "\tchain forward {",
                "\t\t# filter - 5: every forwarded packet of a LAN client meets our counters and quota",
                "\t\t# before fw4's `ct state established accept` (priority filter) could let it by.",
                f"\t\ttype filter hook forward priority {PRIO_FILTER}; policy accept;",
                f'\t\tiifname "{lan}" jump lan_up',
                "\t\t# Towards the LAN only replies to connections a client opened (and ICMP errors about",
                "\t\t# them); anything unrequested is dropped here, before a counter could bill it.",
                f'\t\toifname "{lan}" ct direction reply goto lan_down',
                f'\t\toifname "{lan}" drop',
                "\t}",
                "\tchain lan_up {",
                "\t\t# Upload. Quota first (counts the packet, drops once over), then the MAC+IP binding,",
                "\t\t# whose per-element counter counts exactly the accepted bytes.",
                "\t\tquota name ether saddr . ip saddr map @quota_up4 drop",
                "\t\tquota name ether saddr . ip6 saddr map @quota_up6 drop",
                "\t\tether saddr . ip saddr @paid4 accept",
                "\t\tether saddr . ip6 saddr @paid6 accept",
                "\t\t# A paid device's address not granted yet: noted for the service (neighbour check).",
                "\t\tmeta nfproto ipv6 ether saddr @paid_macs update @seen6 { ether saddr . ip6 saddr }",
                "\t\tmeta l4proto { tcp, udp } ip daddr . th dport @garden4 goto garden_up",
                "\t\tmeta l4proto { tcp, udp } ip6 daddr . th dport @garden6 goto garden_up",
                "\t\tdrop",
                "\t}",
                "\tchain garden_up {",
                "\t\t# One bucket per device; the flow remembers its device for the download side. A full",
                "\t\t# set makes `update` fail: no accept, the packet is dropped (fail closed).",
                f"\t\tupdate @garden_up {{ ether saddr {garden_limit} }}"
                " update @garden_flow { ct id : jhash ether saddr mod 4294967291 } accept",
                "\t\tdrop",
                "\t}",
                "\tchain lan_down {",
                "\t\t# Download, keyed by destination address (no established shortcut before it).",
                "\t\tquota name ip daddr map @quota_down4 drop",
                "\t\tquota name ip6 daddr map @quota_down6 drop",
                "\t\tip daddr @down4 accept",
                "\t\tip6 daddr @down6 accept",
                "\t\tmeta l4proto { tcp, udp } ip saddr . th sport @garden4 goto garden_down",
                "\t\tmeta l4proto { tcp, udp } ip6 saddr . th sport @garden6 goto garden_down",
                "\t\tct state related meta l4proto { icmp, ipv6-icmp } goto garden_down",
                "\t\tdrop",
                "\t}",
                "\tchain garden_down {",
                "\t\t# The device's download bucket, found through its flow (unknown flow: dropped).",
                "\t\t# The packet mark carries the device key from the map into the bucket's key.",
                f"\t\tmeta mark set ct id map @garden_flow update @garden_down {{ meta mark {garden_limit} }} accept",
                "\t\tdrop",
                "\t}",
            ]
        )
    )
    out.append("\n".join(_dns_output_chains(config)))
    out.append("}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# DNS: the captive resolver for clients without access, the owner's resolver metered for the
# others. A name is a channel (iodine, dnscat: data up in long names, down in TXT/NULL answers),
# so no name of a client without access may reach a resolver that forwards it to the outside.


def _check_dns_ports(config: FirewallConfig) -> None:
    p = config.captive_dns_port
    if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536 or p in (config.dns_port,
                                                                                    config.portal_port):
        raise ConfigError(f"invalid captive DNS port: {p!r} (a free port other than DNS and the portal)")


def _dns_sets() -> list[str]:
    dyn = "flags dynamic,timeout"
    return [
        # Paid devices over their byte quota, noted by the packet that found it so (their DNS
        # then goes to the captive resolver); the gate takes a device out when it pays again.
        f"\tset dns_cut {{\n\t\ttype ether_addr\n\t\tsize {DNS_CUT_SIZE}\n\t\t{dyn}\n\t\ttimeout 1m\n\t}}",
        # One token bucket per device for the captive resolver, made by the packet path.
        f"\tset dns_meter {{\n\t\ttype ether_addr\n\t\tsize {CAPTIVE_DNS_DEVICES}\n\t\t{dyn}\n\t\ttimeout 10s\n\t}}",
    ]


def _dns_redirect_chain(config: FirewallConfig) -> list[str]:
    port, r4, r6 = config.captive_dns_port, config.router_ipv4, config.router_ipv6
    tcpudp = "meta l4proto { tcp, udp }"
    lines = [
        "\tchain captive_dns {",
        "\t\t# DNS to the router from a device without access goes to the captive resolver: cut off",
        "\t\t# by its quota, or not granted this MAC . address pair. Negated lookups: no counting.",
    ]
    if r4:
        lines.append(f"\t\tether saddr @dns_cut meta nfproto ipv4 {tcpudp} dnat ip to {r4}:{port}")
    if r6:
        lines.append(f"\t\tether saddr @dns_cut meta nfproto ipv6 {tcpudp} dnat ip6 to [{r6}]:{port}")
    # A paid device's address not granted yet is noted for the service, as in lan_up.
    lines.append("\t\tether saddr . ip6 saddr != @paid6 ether saddr @paid_macs"
                 " update @seen6 { ether saddr . ip6 saddr }")
    if r4:
        lines.append(f"\t\tether saddr . ip saddr != @paid4 {tcpudp} dnat ip to {r4}:{port}")
    if r6:
        lines.append(f"\t\tether saddr . ip6 saddr != @paid6 {tcpudp} dnat ip6 to [{r6}]:{port}")
    lines.append("\t}")
    return lines


def _dns_input_chains(config: FirewallConfig) -> list[str]:
    return [
        "\tchain lan_dns {",
        "\t\t# DNS on the router, judged at every packet (before lan_local's established accept: a",
        "\t\t# flow opened while the device had access ends with the access).",
        f"\t\tth dport {config.captive_dns_port} goto dns_captive",
        "\t\t# The owner's resolver: devices with access only, metered as forwarded traffic is",
        "\t\t# (quota first, then the counting lookup), so paid DNS is no free channel either.",
        "\t\tquota name ether saddr . ip saddr map @quota_up4 goto dns_over",
        "\t\tquota name ether saddr . ip6 saddr map @quota_up6 goto dns_over",
        "\t\tether saddr . ip saddr @paid4 accept",
        "\t\tether saddr . ip6 saddr @paid6 accept",
        "\t\tdrop",
        "\t}",
        "\tchain dns_over {",
        "\t\t# Over its quota: the device's next DNS flows go to the captive resolver (captive_dns).",
        "\t\tupdate @dns_cut { ether saddr }",
        "\t\tdrop",
        "\t}",
        "\tchain dns_captive {",
        "\t\t# One bucket per device (MAC: more addresses buy nothing). A full set makes `update`",
        "\t\t# fail and the lookup after it drops (fail closed).",
        f"\t\tupdate @dns_meter {{ ether saddr limit rate over {CAPTIVE_DNS_RATE} }} drop",
        "\t\tether saddr != @dns_meter drop",
        "\t\taccept",
        "\t}",
    ]


def _dns_output_chains(config: FirewallConfig) -> list[str]:
    return [
        "\tchain output {",
        f"\t\ttype filter hook output priority {PRIO_FILTER}; policy accept;",
        "\t\t# Answers of the owner's resolver (the captive one's still carry its own port here).",
        f'\t\toifname "{config.lan_interface}" meta l4proto {{ tcp, udp }} th sport {config.dns_port} goto lan_dns_out',
        "\t}",
        "\tchain lan_dns_out {",
        "\t\t# A device's DNS answers are download: quota first, then the counting lookup.",
        "\t\tquota name ip daddr map @quota_down4 drop",
        "\t\tquota name ip6 daddr map @quota_down6 drop",
        "\t\tip daddr @down4 accept",
        "\t\tip6 daddr @down6 accept",
        "\t}",
    ]


def dns_uncut(mac: str) -> list[str]:
    """Batch lines taking a device out of `dns_cut` whether or not it is in (nft 1.0.6 has no
    `destroy element`: an `add` of a present element changes nothing, then the delete)."""
    t = f"{FAMILY} {TABLE}"
    mac = normalize_mac(mac)
    return [f"add element {t} dns_cut {{ {mac} }}", f"delete element {t} dns_cut {{ {mac} }}"]


def render_delete() -> str:
    """Remove the table if present (nft 1.0.6 has no `destroy`): create-if-missing, then delete."""
    return f"table {FAMILY} {TABLE} {{\n}}\ndelete table {FAMILY} {TABLE}\n"
