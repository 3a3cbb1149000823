"""Spendable coins on bcoin regtest, for tests (bcoin's bundled wallet is unusable).

- `mine_coinbase_to_key(node, key)` mines coinbases to a key you hold and matures them.
- `sign_p2wpkh_spend(key, coins, outputs)` builds and signs a spend of P2WPKH coins.
- `Faucet` holds coinbases mined early (while the regtest reward is still 50 BTC; bcoin halves
  it every 150 blocks, so late coinbases are worth almost nothing) and pays any script.

A `Coin` is a plain tuple (txid, vout, value, script), so `txid, vout, value, script = coin`.
"""

from __future__ import annotations

import secrets
import threading
import time
from decimal import Decimal
from typing import NamedTuple

from bitcoin.core import (
    CMutableTransaction,
    CMutableTxIn,
    CMutableTxOut,
    COutPoint,
    CScript,
    CScriptWitness,
    CTransaction,
    CTxInWitness,
    CTxWitness,
    lx,
)
from bitcoin.core.script import SIGHASH_ALL, SIGVERSION_WITNESS_V0, SignatureHash
from bitcoin.wallet import CKey

from bitmesh.chain.address import p2pkh_script, p2wpkh_script, script_to_address
from bitmesh.chain.txutil import txid_of
from tests.support.bcoin import BcoinNode

NETWORK = "regtest-bcoin"
COINBASE_MATURITY = 100
DEFAULT_FEE = 2_000  # sat: well above 1 sat/vB for a few inputs, far from "absurdly-high-fee"


class Coin(NamedTuple):
    txid: str
    vout: int
    value: int  # satoshis
    script: bytes  # scriptPubKey of the output


def new_key() -> CKey:
    return CKey(secrets.token_bytes(32), compressed=True)


def key_address(key: CKey, kind: str = "p2wpkh") -> str:
    """bcoin regtest address of `key` ("p2wpkh" -> rb1..., "p2pkh" -> base58, version 0x3c)."""
    script = p2wpkh_script(key.pub) if kind == "p2wpkh" else p2pkh_script(key.pub)
    return script_to_address(script, NETWORK)


def mine_coinbase_to_key(node: BcoinNode, key: CKey, blocks: int = 1, kind: str = "p2wpkh") -> list[Coin]:
    """Mine `blocks` blocks paying `key` (P2WPKH or P2PKH), then 100 more to a throwaway
    address so the coinbases are spendable. Returns the coinbase outputs paying the key.

    A bcoin regtest coinbase pays 50 BTC >> (height // 150): nothing from height 9600 on.
    Spending P2WPKH needs segwit (height >= 432); on a younger chain use kind="p2pkh"."""
    address = key_address(key, kind)
    script = p2wpkh_script(key.pub) if kind == "p2wpkh" else p2pkh_script(key.pub)
    coins = []
    for block_hash in node.mine(blocks, address):
        block = node.rpc("getblock", block_hash, True, True)
        tx = block["tx"][0]
        for out in tx["vout"]:
            if bytes.fromhex(out["scriptPubKey"]["hex"]) == script:
                coins.append(Coin(tx["txid"], out["n"], _sats(out["value"]), script))
    node.mine(COINBASE_MATURITY, key_address(new_key()))
    return coins


def _sats(btc: float | int | str) -> int:
    return int((Decimal(str(btc)) * 100_000_000).to_integral_value())


def sign_p2wpkh_spend(
    key: CKey,
    coins: list[Coin],
    outputs: list[tuple[bytes, int]],
    *,
    locktime: int = 0,
    sequence: int = 0xFFFFFFFF,
    version: int = 2,
) -> CTransaction:
    """A transaction spending `coins` (all P2WPKH of `key`) to `outputs` [(scriptPubKey, sats)],
    signed SIGHASH_ALL with the BIP143 digest (it commits to each input's amount). The fee is
    whatever the inputs leave over: give the spend a change output (bcoin refuses an
    absurdly high fee)."""
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(lx(c.txid), c.vout), nSequence=sequence) for c in coins],
        [CMutableTxOut(value, CScript(script)) for script, value in outputs],
        nLockTime=locktime,
        nVersion=version,
    )
    # BIP143: the script code of P2WPKH is the P2PKH script of the same key
    script_code = CScript(p2pkh_script(key.pub))
    witnesses = []
    for i, coin in enumerate(coins):
        digest = SignatureHash(script_code, tx, i, SIGHASH_ALL, amount=coin.value, sigversion=SIGVERSION_WITNESS_V0)
        sig = key.sign(digest) + bytes([SIGHASH_ALL])
        witnesses.append(CTxInWitness(CScriptWitness([sig, key.pub])))
    tx.wit = CTxWitness(witnesses)
    return CTransaction.from_tx(tx)


def sign_p2pkh_spend(
    key: CKey, coins: list[Coin], outputs: list[tuple[bytes, int]], *, locktime: int = 0, version: int = 2
) -> CTransaction:
    """Like sign_p2wpkh_spend for P2PKH coins of `key` (legacy digest, signature in scriptSig)."""
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(lx(c.txid), c.vout)) for c in coins],
        [CMutableTxOut(value, CScript(script)) for script, value in outputs],
        nLockTime=locktime,
        nVersion=version,
    )
    for i, coin in enumerate(coins):
        digest = SignatureHash(CScript(coin.script), tx, i, SIGHASH_ALL)
        tx.vin[i].scriptSig = CScript([key.sign(digest) + bytes([SIGHASH_ALL]), key.pub])
    return CTransaction.from_tx(tx)


class Faucet:
    """Early regtest coinbases of one P2WPKH key, paid out to any script on demand.

    `pay()` spends one whole coin per call (a confirmed one when it can, so mempool chains stay
    short) and keeps the change as a new coin. Thread-safe; the node checks every spend."""

    def __init__(self, node: BcoinNode, key: CKey, coins: list[Coin]):
        self.node, self.key = node, key
        self.script = p2wpkh_script(key.pub)
        self._coins = list(coins)
        self._lock = threading.Lock()

    @classmethod
    def mine(cls, node: BcoinNode, blocks: int = 40) -> Faucet:
        """Mine `blocks` coinbases to a fresh key (and mature them). Call this early, before
        the reward has halved away: at height h a bcoin regtest coinbase pays 50 BTC >> h//150."""
        key = new_key()
        return cls(node, key, mine_coinbase_to_key(node, key, blocks))

    @property
    def balance(self) -> int:
        return sum(c.value for c in self._coins)

    def pay(self, script: bytes, value: int, fee: int = DEFAULT_FEE) -> tuple[Coin, CTransaction]:
        """Send `value` sats to `script` (output 0) and broadcast; returns the new coin (unconfirmed:
        mine a block when the test needs confirmations) and the transaction."""
        with self._lock:
            coin = self._pick(value + fee)
            change = coin.value - value - fee
            tx = sign_p2wpkh_spend(self.key, [coin], [(script, value), (self.script, change)])
            txid = txid_of(tx)
            self.node.rpc("sendrawtransaction", tx.serialize().hex())
            if not self._held(txid):
                self._coins.append(coin)
                reason = self.node.reject_reason(txid)
                raise RuntimeError(f"faucet tx {txid} refused by the node: {reason}")
            self._coins.append(Coin(txid, 1, change, self.script))
            return Coin(txid, 0, value, script), tx

    def capacity(self, value: int, fee: int = DEFAULT_FEE) -> int:
        """How many `pay(script, value)` calls the faucet can still answer (each coin pays whole
        amounts until its change would be dust). A soak checks it before funding its clients."""
        return sum(max(0, (c.value - 546) // (value + fee)) for c in self._coins)

    def pay_many(self, outputs: list[tuple[bytes, int]], feerate_sat_vb: int = 2) -> list[Coin]:
        """Pay every (script, value) of `outputs` in ONE transaction from one coin (hundreds of
        clients funded by one broadcast: no long mempool chain, one block confirms them all).
        Returns the new coins in order (unconfirmed); the change stays in the faucet."""
        total = sum(value for _, value in outputs)
        vsize = 11 + 68 + 31 * (len(outputs) + 1) + 2 * len(outputs)  # P2WPKH in/outs, generous
        fee = max(DEFAULT_FEE, feerate_sat_vb * vsize)
        with self._lock:
            coin = self._pick(total + fee)
            change = coin.value - total - fee
            tx = sign_p2wpkh_spend(self.key, [coin], [*outputs, (self.script, change)])
            txid = txid_of(tx)
            self.node.rpc("sendrawtransaction", tx.serialize().hex())
            if not self._held(txid):
                self._coins.append(coin)
                raise RuntimeError(f"faucet tx {txid} refused by the node: {self.node.reject_reason(txid)}")
            self._coins.append(Coin(txid, len(outputs), change, self.script))
            return [Coin(txid, i, value, bytes(script)) for i, (script, value) in enumerate(outputs)]

    def _pick(self, need: int) -> Coin:
        usable = [c for c in self._coins if c.value >= need + 546]
        if not usable:
            raise RuntimeError(f"faucet cannot pay {need} sat (balance {self.balance})")
        confirmed = [c for c in usable if (self.node.rpc("gettxout", c.txid, c.vout, True) or {}).get("confirmations")]
        coin = (confirmed or usable)[0]
        self._coins.remove(coin)
        return coin

    def _held(self, txid: str) -> bool:
        # bcoin's sendrawtransaction answers before the mempool has judged the tx
        for delay in (0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4):
            time.sleep(delay)
            if self.node.mempool_has(txid):
                return True
        return False
