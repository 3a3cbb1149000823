"""The second judge works: Bitcoin Core's consensus interpreter (libbitcoinkernel) accepts the
project's settlements and refunds as the bcoin node does, and refuses a tampered one."""

from __future__ import annotations

import pytest
from bitcoin.core import CTransaction

from tests.support.consensus import ConsensusError, verify_spends
from tests.support.hotspot import Hotspot, confirmed_tx, mine_to

pytestmark = pytest.mark.regtest


def _tampered_witness(tx: CTransaction, item: int) -> bytes:
    mtx = tx.serialize()
    sig = tx.wit.vtxinwit[0].scriptWitness.stack[item]
    i = mtx.index(sig)
    return mtx[:i + 10] + bytes([mtx[i + 10] ^ 1]) + mtx[i + 11:]


def test_core_accepts_the_settlement_and_refund_and_refuses_tampered_ones(hotspot: Hotspot):
    payer = hotspot.funded_payer(50_000)
    payer.pay_exact(5_000)
    closed = payer.close()
    hotspot.mine(1)
    settlement = confirmed_tx(hotspot.node, closed["settlement_txid"])  # verified by Core inside
    contract = payer.channel.contract
    spent = [(contract.script_pubkey, 50_000)]
    verify_spends(settlement, spent)
    for item in (0, 1):  # the client's signature, the router's
        with pytest.raises(ConsensusError):
            verify_spends(_tampered_witness(settlement, item), spent)
    with pytest.raises(ConsensusError):  # BIP143 commits to the amount spent
        verify_spends(settlement, [(spent[0][0], 50_001)])

    other = hotspot.funded_payer(20_000)
    refund = other.channel.refund
    mine_to(hotspot, other.channel.contract.expiry)
    txid = hotspot.chain.broadcast(refund.serialize())
    hotspot.mine(1)
    confirmed_tx(hotspot.node, txid)
    with pytest.raises(ConsensusError):  # CLTV: the same refund with an earlier lock time
        early = CTransaction(refund.vin, refund.vout, refund.nLockTime - 1, refund.nVersion, refund.wit)
        verify_spends(early, [(other.channel.contract.script_pubkey, 20_000)])
