"""Mine a block of our own choosing on a regtest node (submitblock).

bcoin's mempool refuses a conflicting transaction, so a double spend of a 0-conf funding
can only be staged the way a miner would do it: a block that confirms the conflict.
Segwit transactions get the BIP141 witness commitment in the coinbase.
"""

from __future__ import annotations

import hashlib

from bitcoin.core import (
    CBlock,
    CMutableTransaction,
    COutPoint,
    CScript,
    CTransaction,
    CTxIn,
    CTxInWitness,
    CTxOut,
    CTxWitness,
    b2lx,
    lx,
)
from bitcoin.core.script import OP_RETURN, CScriptWitness


def mine_block_with(node, txs: list[CTransaction]) -> str:
    """Mine one block on top of the tip holding exactly `txs` (parents before children); returns
    its hash. With segwit transactions the coinbase carries the BIP141 witness commitment."""
    tip_hash = node.rpc("getbestblockhash")
    tip = node.rpc("getblockheader", tip_hash, True)
    height = tip["height"] + 1
    witness = any(tx.has_witness() for tx in txs)
    reserved = b"\x00" * 32  # the witness reserved value
    coinbase = CMutableTransaction(
        [CTxIn(COutPoint(), CScript([height, b"bitmesh-test"]), 0xFFFFFFFF)],
        [CTxOut(0, CScript([OP_RETURN]))],  # claims nothing: fees and subsidy are forfeited
    )
    if witness:
        coinbase.wit = CTxWitness([CTxInWitness(CScriptWitness([reserved]))])
    block = CBlock(
        nVersion=0x20000000,
        hashPrevBlock=lx(tip_hash),
        nTime=max(tip["time"], tip["mediantime"]) + 1,
        nBits=int(tip["bits"], 16) if isinstance(tip["bits"], str) else int(tip["bits"]),  # bcoin: a number
        vtx=[CTransaction.from_tx(coinbase), *txs],
    )
    if witness:
        commitment = hashlib.sha256(hashlib.sha256(block.calc_witness_merkle_root() + reserved).digest()).digest()
        coinbase.vout.append(CTxOut(0, CScript([OP_RETURN, b"\xaa\x21\xa9\xed" + commitment])))
        block = CBlock(block.nVersion, block.hashPrevBlock, nTime=block.nTime, nBits=block.nBits,
                       vtx=[CTransaction.from_tx(coinbase), *txs])
    exponent, mantissa = block.nBits >> 24, block.nBits & 0xFFFFFF
    target = mantissa << (8 * (exponent - 3))
    merkle = block.calc_merkle_root()
    for nonce in range(1 << 20):
        candidate = CBlock(block.nVersion, block.hashPrevBlock, merkle, block.nTime, block.nBits, nonce, block.vtx)
        if int.from_bytes(candidate.GetHash(), "little") <= target:
            break
    else:
        raise RuntimeError("no nonce found")
    result = node.rpc("submitblock", candidate.serialize().hex())
    if result not in (None, "", "inconclusive"):
        raise RuntimeError(f"submitblock refused the block: {result}")
    block_hash = b2lx(candidate.GetHash())
    if node.rpc("getbestblockhash") != block_hash:
        raise RuntimeError("the block did not become the tip")
    return block_hash
