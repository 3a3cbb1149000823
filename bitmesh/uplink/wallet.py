"""The owner-funded wallet an uplink channel is paid from: one deposit address, its coins.

Keys come from the node seed on a branch of their own, apart from every channel key
(m/1017'/0'/<index>', bitmesh/channel/keys.py):

    m/1017'/2'/0'/0'   the deposit key: the address the owner funds, shown in LuCI and over ubus;
                       the change of each funding and the refunds of uplink channels come back here
    m/1017'/2'/1'/<n>' the client key of uplink channel number n (a restored seed re-derives it)

Account 2' is the uplink's alone: account 0' holds the channel keys; 1' is left to the node
identity (issue 11). Coins are whatever the chain backend lists for the deposit address (nothing
kept on flash): what a crash or a restart leaves is read back from the chain. The funding itself
is built by bitmesh.channel.payer.build_funding, through PayerSession.fund_from_coins.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from bitcoin.wallet import CKey

from bitmesh.chain.address import p2wpkh_script, script_to_address
from bitmesh.channel import contract as c
from bitmesh.channel.keys import PURPOSE, _ckd_hardened  # the one BIP32 step BitMesh has
from bitmesh.channel.payer import Coin

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from bitmesh.chain.base import ChainBackend

UPLINK_ACCOUNT = 2
DEPOSIT_BRANCH = 0
CHANNEL_BRANCH = 1


def derive_secret(seed: bytes, *path: int) -> bytes:
    """The private key at m/<path> (every step hardened) from `seed`, as BIP32 derives it."""
    digest = hmac.new(b"Bitcoin seed", seed, hashlib.sha512).digest()
    key, chain = int.from_bytes(digest[:32], "big"), digest[32:]
    for step in path:
        key, chain = _ckd_hardened(key, chain, step)
    return key.to_bytes(32, "big")


@dataclass(frozen=True)
class Balance:
    confirmed: int
    unconfirmed: int  # in the mempool: spendable too (the upstream router judges 0-conf fundings)

    @property
    def total(self) -> int:
        return self.confirmed + self.unconfirmed

    def to_json(self) -> dict:
        return {"confirmed_sat": self.confirmed, "unconfirmed_sat": self.unconfirmed, "total_sat": self.total}


class UplinkWallet:
    """The deposit address of `seed` on `network` and its coins as `chain` sees them."""

    def __init__(self, seed: bytes, chain: ChainBackend, network: str):
        self._seed = seed
        self.chain = chain
        self.network = network
        self.key = CKey(derive_secret(seed, PURPOSE, UPLINK_ACCOUNT, DEPOSIT_BRANCH, 0), compressed=True)
        self.script = p2wpkh_script(self.key.pub)
        self.address = script_to_address(self.script, network)

    def channel_secret(self, number: int) -> bytes:
        """The client key of uplink channel `number`: from the seed, so a restore finds it."""
        return derive_secret(self._seed, PURPOSE, UPLINK_ACCOUNT, CHANNEL_BRANCH, number)

    def coins(self, exclude: frozenset[c.Outpoint] | set[c.Outpoint] = frozenset()) -> list[Coin]:
        """Spendable coins of the deposit address, minus `exclude` (outpoints a funding of ours
        already spends while the backend may not know it yet)."""
        return [Coin(c.Outpoint(u.txid, u.vout), u.value, self.script, self.key)
                for u in self.chain.address_unspent(self.address) if c.Outpoint(u.txid, u.vout) not in exclude]

    def balance(self) -> Balance:
        found = self.chain.address_unspent(self.address)
        return Balance(sum(u.value for u in found if u.height is not None),
                       sum(u.value for u in found if u.height is None))

    def __repr__(self) -> str:  # never show key material
        return f"UplinkWallet({self.address})"
