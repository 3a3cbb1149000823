"""The node's identity key: what signs its offers, and what its node_id is made from.

The key is the HD key m/1017'/0'/2147483647' of the node seed (ChannelKeychain index
NODE_KEY_INDEX, the last hardened index). Channel keys are handed out from index 0 upwards, one
per opened channel (ledger.key_mark), so a channel would reach this index only after 2^31 opens:
the identity key never signs a transaction. It is the key the service has always taken its
node_id from (service.build_service), so node ids stay what they were, and a node_id is bound to
the public key: the first 16 hex digits of the compressed key (a forger with another key must
find one whose first 8 bytes match: about 2^56 point multiplications per node it targets).
"""

from __future__ import annotations

NODE_KEY_INDEX = 0x7FFFFFFF
NODE_ID_HEX = 16  # hex digits of the compressed public key that make the node_id


def node_key(keychain):
    """The node's identity key (a python-bitcoinlib CKey) from its ChannelKeychain."""
    return keychain.key(NODE_KEY_INDEX)


def node_id_of(pubkey: bytes) -> str:
    """The node_id a public key stands for (what build_service hands the portal)."""
    return pubkey.hex()[:NODE_ID_HEX]
