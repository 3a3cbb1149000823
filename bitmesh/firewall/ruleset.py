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
* Unpaid clients: DHCP, DNS and the portal on the router itself (input chain), HTTP redirected
  to the portal (dnat in prerouting), the walled garden (Bitcoin P2P/Electrum ports anywhere,
  configured hosts on any port) rate limited per client, and nothing else, IPv6 included.
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

DEFAULT_GARDEN_PORTS = (8333, 18333, 18444, 50001, 50002)  # Bitcoin P2P main/test/regtest, Electrum

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
    garden_ports: tuple[int, ...] = DEFAULT_GARDEN_PORTS
    garden_hosts4: tuple[str, ...] = ()  # addresses or CIDR prefixes reachable on any port
    garden_hosts6: tuple[str, ...] = ()
    garden_rate_kbytes: int = 64  # per unpaid client and direction, kbytes/second
    garden_burst_kbytes: int = 256

    def validate(self) -> None:
        if not _IFNAME.match(self.lan_interface):
            raise ConfigError(f"invalid LAN interface name: {self.lan_interface!r}")
        if self.router_ipv4 is None and self.router_ipv6 is None:
            raise ConfigError("the router needs an IPv4 or an IPv6 LAN address")
        if self.router_ipv4 is not None:
            _addr(self.router_ipv4, 4, ConfigError)
        if self.router_ipv6 is not None:
            _addr(self.router_ipv6, 6, ConfigError)
        for port in (self.portal_port, self.dns_port, *self.garden_ports):
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"invalid port: {port!r}")
        for net in self.garden_hosts4:
            _net(net, 4)
        for net in self.garden_hosts6:
            _net(net, 6)
        for rate in (self.garden_rate_kbytes, self.garden_burst_kbytes):
            if not isinstance(rate, int) or rate <= 0:
                raise ConfigError(f"invalid walled-garden rate: {rate!r}")


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


def _net(text: str, version: int) -> str:
    try:
        n = ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ConfigError(f"invalid walled-garden host: {text!r}") from None
    if n.version != version:
        raise ConfigError(f"walled-garden host {text!r} is not IPv{version}")
    return str(n)


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


def client_elements(client: PaidClient, now: float) -> ClientElements:
    """Elements for one (normalized) client. Used bytes go on the first element of each direction."""
    ms = timeout_ms(client, now)
    el = ClientElements()
    if ms is not None and ms <= 0:
        return el  # expired: no access at all
    qn = quota_name(client.mac)
    up_left, down_left = client.used_up, client.used_down
    if client.quota_bytes is not None:
        # The element counters sit before the quota and also count the packets it drops, so the
        # bytes counted can pass the limit; the kernel refuses a quota used beyond its limit
        # (EINVAL), and one used up to it is just as exhausted.
        limit = int(client.quota_bytes)
        el.quota = f"over {limit} bytes used {min(client.used, limit)} bytes"
    if client.ipv4:
        el.add("paid4", f"{client.mac} . {client.ipv4}{_ctr(up_left)}{_tmo(ms)}")
        el.add("down4", f"{client.ipv4}{_ctr(down_left)}{_tmo(ms)}")
        up_left = down_left = 0
        if el.quota:
            el.add("quota_up4", f'{client.mac} . {client.ipv4} : "{qn}"')
            el.add("quota_down4", f'{client.ipv4} : "{qn}"')
    for a in client.ipv6:
        el.add("paid6", f"{client.mac} . {a}{_ctr(up_left)}{_tmo(ms)}")
        el.add("down6", f"{a}{_ctr(down_left)}{_tmo(ms)}")
        up_left = down_left = 0
        if el.quota:
            el.add("quota_up6", f'{client.mac} . {a} : "{qn}"')
            el.add("quota_down6", f'{a} : "{qn}"')
    return el


# name -> (declaration lines without elements)
SET_DECLS: dict[str, str] = {
    "paid4": "type ether_addr . ipv4_addr\n\t\tflags timeout\n\t\tcounter",
    "paid6": "type ether_addr . ipv6_addr\n\t\tflags timeout\n\t\tcounter",
    "down4": "type ipv4_addr\n\t\tflags timeout\n\t\tcounter",
    "down6": "type ipv6_addr\n\t\tflags timeout\n\t\tcounter",
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

    ports = ", ".join(str(p) for p in sorted(set(config.garden_ports)))
    rate = f"{config.garden_rate_kbytes} kbytes/second burst {config.garden_burst_kbytes} kbytes"
    g4 = sorted({_net(n, 4) for n in config.garden_hosts4})
    g6 = sorted({_net(n, 6) for n in config.garden_hosts6})

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
    out.append(f"\tset garden4 {{\n\t\ttype ipv4_addr\n\t\tflags interval{_elements(g4)}\n\t}}")
    out.append(f"\tset garden6 {{\n\t\ttype ipv6_addr\n\t\tflags interval{_elements(g6)}\n\t}}")
    for name, typ in (("meter_up4", "ipv4_addr"), ("meter_up6", "ipv6_addr"),
                      ("meter_down4", "ipv4_addr"), ("meter_down6", "ipv6_addr")):
        # Per-client token buckets for the walled garden, created by the packet path.
        out.append(f"\tset {name} {{\n\t\ttype {typ}\n\t\tsize 4096\n\t\tflags dynamic,timeout\n\t\ttimeout 1m\n\t}}")

    redirect = []
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
                "\t}",
                "\tchain captive {",
                *redirect,
                "\t}",
            ]
        )
    )
    out.append(
        "\n".join(
            [
                "\tchain input {",
                "\t\t# filter - 5: our drop is final before fw4 runs; our accept still passes through fw4.",
                f"\t\ttype filter hook input priority {PRIO_FILTER}; policy accept;",
                f'\t\tiifname "{lan}" jump lan_local',
                "\t}",
                "\tchain lan_local {",
                "\t\t# What every LAN client (paid or not) may reach on the router itself.",
                "\t\tct state established,related accept",
                "\t\tmeta l4proto { icmp, ipv6-icmp } accept",
                "\t\tudp dport { 67, 547 } accept",
                f"\t\tmeta l4proto {{ tcp, udp }} th dport {config.dns_port} accept",
                f"\t\ttcp dport {config.portal_port} accept",
                "\t\tdrop",
                "\t}",
            ]
        )
    )
    garden_up = [f"\t\tmeta l4proto {{ tcp, udp }} th dport {{ {ports} }} goto garden_up"] if ports else []
    garden_down = (
        [f"\t\tct state established,related meta l4proto {{ tcp, udp }} th sport {{ {ports} }} goto garden_down"]
        if ports
        else []
    )
    out.append(
        "\n".join(
            [
                "\tchain forward {",
                "\t\t# filter - 5: every forwarded packet of a LAN client meets our counters and quota",
                "\t\t# before fw4's `ct state established accept` (priority filter) could let it by.",
                f"\t\ttype filter hook forward priority {PRIO_FILTER}; policy accept;",
                f'\t\tiifname "{lan}" jump lan_up',
                f'\t\toifname "{lan}" jump lan_down',
                "\t}",
                "\tchain lan_up {",
                "\t\t# Upload. Quota first (counts the packet, drops once over), then the MAC+IP binding,",
                "\t\t# whose per-element counter counts exactly the accepted bytes.",
                "\t\tquota name ether saddr . ip saddr map @quota_up4 drop",
                "\t\tquota name ether saddr . ip6 saddr map @quota_up6 drop",
                "\t\tether saddr . ip saddr @paid4 accept",
                "\t\tether saddr . ip6 saddr @paid6 accept",
                *garden_up,
                "\t\tip daddr @garden4 goto garden_up",
                "\t\tip6 daddr @garden6 goto garden_up",
                "\t\tdrop",
                "\t}",
                "\tchain garden_up {",
                f"\t\tupdate @meter_up4 {{ ip saddr limit rate over {rate} }} drop",
                f"\t\tupdate @meter_up6 {{ ip6 saddr limit rate over {rate} }} drop",
                "\t\taccept",
                "\t}",
                "\tchain lan_down {",
                "\t\t# Download, keyed by destination address (no established shortcut before it).",
                "\t\tquota name ip daddr map @quota_down4 drop",
                "\t\tquota name ip6 daddr map @quota_down6 drop",
                "\t\tip daddr @down4 accept",
                "\t\tip6 daddr @down6 accept",
                *garden_down,
                "\t\tct state established,related ip saddr @garden4 goto garden_down",
                "\t\tct state established,related ip6 saddr @garden6 goto garden_down",
                "\t\tct state related meta l4proto { icmp, ipv6-icmp } goto garden_down",
                "\t\tdrop",
                "\t}",
                "\tchain garden_down {",
                f"\t\tupdate @meter_down4 {{ ip daddr limit rate over {rate} }} drop",
                f"\t\tupdate @meter_down6 {{ ip6 daddr limit rate over {rate} }} drop",
                "\t\taccept",
                "\t}",
            ]
        )
    )
    out.append("}")
    return "\n".join(out) + "\n"


def render_delete() -> str:
    """Remove the table if present (nft 1.0.6 has no `destroy`): create-if-missing, then delete."""
    return f"table {FAMILY} {TABLE} {{\n}}\ndelete table {FAMILY} {TABLE}\n"
