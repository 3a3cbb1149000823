"""Firewall and metering: `table inet bitmesh` (nftables), driven through the `nft` command.

    gate = Gate(FirewallConfig(lan_interface="br-lan", router_ipv4="192.168.1.1"))
    gate.start(clients_from_ledger)           # atomic load, restores paid clients
    gate.allow(PaidClient(mac, ipv4=ip, quota_bytes=n))
    gate.update_quota(mac, quota_bytes=n2)     # after a payment; used bytes are kept
    gate.usage()                               # {mac: ClientUsage(bytes_up, bytes_down, ...)}
    gate.revoke(mac); gate.stop()
"""

from bitmesh.firewall.gate import ClientUsage, Gate
from bitmesh.firewall.nft import Nft
from bitmesh.firewall.ruleset import (
    ClientAddressError,
    FirewallConfig,
    FirewallError,
    PaidClient,
    UnknownClient,
    render,
)

__all__ = [
    "ClientAddressError",
    "ClientUsage",
    "FirewallConfig",
    "FirewallError",
    "Gate",
    "Nft",
    "PaidClient",
    "UnknownClient",
    "render",
]
