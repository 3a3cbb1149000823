"""Bitcoin Core's own consensus script interpreter (libbitcoinkernel, PyPI `py-bitcoinkernel`) as a
second judge of every transaction the project builds or accepts, beside the bcoin node.

`verify_spends(tx, prevouts)` runs each input against the output it spends with all of Core's
consensus flags (P2SH, DERSIG, NULLDUMMY, CLTV, CSV, WITNESS, TAPROOT); `verify_on_node(node,
txid)` takes the transaction and the outputs it spends from the node. tests/support/router.py's
read_settlement and tests/support/hotspot.py's confirmed_tx call it, so every settlement and
refund a test reads back from the chain has passed Core's interpreter too.
"""

from __future__ import annotations

from collections.abc import Sequence

import pbk
from bitcoin.core import CTransaction


class ConsensusError(AssertionError):
    """Bitcoin Core's interpreter refused an input."""


def verify_spends(tx: bytes | CTransaction, prevouts: Sequence[tuple[bytes, int]]) -> None:
    """Every input of `tx` against the (scriptPubKey, amount) it spends, in input order."""
    raw = tx.serialize() if isinstance(tx, CTransaction) else tx
    ctx = CTransaction.deserialize(raw)
    if len(prevouts) != len(ctx.vin):
        raise ValueError(f"{len(ctx.vin)} inputs, {len(prevouts)} prevouts")
    kernel_tx = pbk.Transaction(raw)
    spent = [pbk.TransactionOutput(pbk.ScriptPubkey(script), amount) for script, amount in prevouts]
    precomputed = pbk.script.PrecomputedTransactionData(kernel_tx, spent)
    for i, (script, amount) in enumerate(prevouts):
        try:
            ok = pbk.ScriptPubkey(script).verify(amount, kernel_tx, precomputed, i, pbk.ScriptVerificationFlags.ALL)
        except pbk.ScriptVerifyException as e:
            raise ConsensusError(f"input {i} of {ctx.GetTxid()[::-1].hex()}: Core's interpreter refused it: {e}") from e
        if not ok:
            raise ConsensusError(f"input {i} of {ctx.GetTxid()[::-1].hex()}: script verification failed in Core")


def verify_on_node(node, txid: str) -> CTransaction:
    """The transaction `txid` as the node has it, each input checked by Core's interpreter
    against the output the node says it spends."""
    tx = CTransaction.deserialize(bytes.fromhex(node.rpc("getrawtransaction", txid, 1)["hex"]))
    prevouts = []
    for txin in tx.vin:
        parent = CTransaction.deserialize(bytes.fromhex(node.rpc("getrawtransaction", txin.prevout.hash[::-1].hex(),
                                                                 1)["hex"]))
        out = parent.vout[txin.prevout.n]
        prevouts.append((bytes(out.scriptPubKey), out.nValue))
    verify_spends(tx, prevouts)
    return tx
