"""Bitcoin addresses <-> output scripts for every network BitMesh runs on.

python-bitcoinlib knows one network at a time through global state and has no bech32m; the
service needs several (the owner's payout address on mainnet, bcoin's regtest in tests), so
addresses are handled here, explicitly per network.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bitcoin.base58 import Base58Error, CBase58Data

from bitmesh.errors import RequestError


@dataclass(frozen=True)
class Network:
    name: str
    hrp: str
    p2pkh_version: int
    p2sh_version: int
    bip21_scheme: str = "bitcoin"


NETWORKS: dict[str, Network] = {
    n.name: n
    for n in (
        Network("main", "bc", 0x00, 0x05),
        Network("test", "tb", 0x6F, 0xC4),
        Network("signet", "tb", 0x6F, 0xC4),
        Network("regtest", "bcrt", 0x6F, 0xC4),
        # bcoin's regtest uses its own prefixes (what the test node speaks)
        Network("regtest-bcoin", "rb", 0x3C, 0x26),
    )
}


def get_network(name: str) -> Network:
    try:
        return NETWORKS[name]
    except KeyError:
        raise RequestError(f"unknown network {name!r}; one of {sorted(NETWORKS)}", code="network_unknown") from None


class AddressError(RequestError):
    """The address is not valid for this network."""

    code = "address_invalid"


# --- bech32 / bech32m (BIP173, BIP350) ---------------------------------------------------

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_CONST = 1
_BECH32M_CONST = 0x2BC830A3


def _polymod(values: list[int]) -> int:
    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convertbits(data: bytes | list[int], frombits: int, tobits: int, pad: bool) -> list[int] | None:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        if value < 0 or value >> frombits:
            return None
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (tobits - bits)) & maxv)
    elif not pad and (bits >= frombits or ((acc << (tobits - bits)) & maxv)):
        return None
    return out


def _segwit_encode(hrp: str, witver: int, witprog: bytes) -> str:
    data = [witver] + (_convertbits(witprog, 8, 5, True) or [])
    const = _BECH32_CONST if witver == 0 else _BECH32M_CONST
    polymod = _polymod(_hrp_expand(hrp) + data + [0] * 6) ^ const
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[d] for d in data + checksum)


def _segwit_decode(hrp: str, addr: str) -> tuple[int, bytes] | None:
    if addr.lower() != addr and addr.upper() != addr:
        return None
    addr = addr.lower()
    pos = addr.rfind("1")
    if pos < 1 or pos + 7 > len(addr) or len(addr) > 90 or addr[:pos] != hrp:
        return None
    if any(c not in _CHARSET for c in addr[pos + 1 :]):
        return None
    data = [_CHARSET.find(c) for c in addr[pos + 1 :]]
    const = _polymod(_hrp_expand(hrp) + data)
    if const not in (_BECH32_CONST, _BECH32M_CONST):
        return None
    witver, prog5 = data[0], data[1:-6]
    prog = _convertbits(prog5, 5, 8, False)
    if prog is None or witver > 16 or not 2 <= len(prog) <= 40:
        return None
    if (witver == 0) != (const == _BECH32_CONST):
        return None
    if witver == 0 and len(prog) not in (20, 32):
        return None
    return witver, bytes(prog)


# --- scripts -----------------------------------------------------------------------------


def _witness_script(witver: int, prog: bytes) -> bytes:
    return bytes([0x50 + witver if witver else 0, len(prog)]) + prog


def address_to_script(address: str, network: Network | str) -> bytes:
    """scriptPubKey for `address`; raises AddressError when it does not belong to `network`."""
    net = get_network(network) if isinstance(network, str) else network
    if not isinstance(address, str) or not address or len(address) > 90:
        raise AddressError("address must be a non-empty string")
    decoded = _segwit_decode(net.hrp, address)
    if decoded is not None:
        return _witness_script(*decoded)
    try:
        data = CBase58Data(address)
    except (Base58Error, ValueError):
        raise AddressError(f"{address!r} is not a valid {net.name} address") from None
    if len(data) == 20 and data.nVersion == net.p2pkh_version:
        return b"\x76\xa9\x14" + bytes(data) + b"\x88\xac"
    if len(data) == 20 and data.nVersion == net.p2sh_version:
        return b"\xa9\x14" + bytes(data) + b"\x87"
    raise AddressError(f"{address!r} is not a valid {net.name} address")


def script_to_address(script: bytes, network: Network | str) -> str:
    net = get_network(network) if isinstance(network, str) else network
    if len(script) == 25 and script[:3] == b"\x76\xa9\x14" and script[23:] == b"\x88\xac":
        return str(CBase58Data.from_bytes(script[3:23], net.p2pkh_version))
    if len(script) == 23 and script[:2] == b"\xa9\x14" and script[22] == 0x87:
        return str(CBase58Data.from_bytes(script[2:22], net.p2sh_version))
    if 4 <= len(script) <= 42 and script[1] == len(script) - 2 and (script[0] == 0 or 0x51 <= script[0] <= 0x60):
        witver = 0 if script[0] == 0 else script[0] - 0x50
        return _segwit_encode(net.hrp, witver, script[2:])
    raise AddressError("script has no address form", code="script_not_standard")


def p2wsh_script(witness_script: bytes) -> bytes:
    return b"\x00\x20" + hashlib.sha256(witness_script).digest()


def p2wpkh_script(pubkey: bytes) -> bytes:
    return b"\x00\x14" + hash160(pubkey)


def p2pkh_script(pubkey: bytes) -> bytes:
    return b"\x76\xa9\x14" + hash160(pubkey) + b"\x88\xac"


def hash160(data: bytes) -> bytes:
    from bitcoin.core import Hash160

    return Hash160(data)
