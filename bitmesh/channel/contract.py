"""The channel contract: witness script, transaction templates and signature rules.

Pure functions only (no I/O, no state), in the spirit of Electrum's lnutil: both the server
(bitmesh.channel.server) and the payer (bitmesh.channel.payer) build the exact same
transactions from here, so a signature made by one verifies for the other.

Contract (P2WSH witness script), one fresh server key per channel:

    IF <server_pub> CHECKSIGVERIFY ELSE <expiry> CHECKLOCKTIMEVERIFY DROP ENDIF <client_pub> CHECKSIG

docs/protocol.md describes every field byte by byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness, lx
from bitcoin.core.key import CPubKey
from bitcoin.core.script import (
    OP_CHECKLOCKTIMEVERIFY,
    OP_CHECKSIG,
    OP_CHECKSIGVERIFY,
    OP_DROP,
    OP_ELSE,
    OP_ENDIF,
    OP_IF,
    SIGHASH_ALL,
    SIGHASH_ANYONECANPAY,
    SIGHASH_NONE,
    SIGHASH_SINGLE,
    SIGVERSION_WITNESS_V0,
    CScript,
    CScriptWitness,
    SignatureHash,
)

from bitmesh.chain.address import p2pkh_script, p2wpkh_script, p2wsh_script
from bitmesh.chain.txutil import txid_of  # noqa: F401 - part of this module's API
from bitmesh.errors import ChannelError

DUST_LIMIT_SAT = 546
TX_VERSION = 2
# Spends of the contract never signal RBF (bcoin refuses RBF without -replace-by-fee) and
# must not be 0xFFFFFFFF, or CHECKLOCKTIMEVERIFY fails on the refund path.
CONTRACT_INPUT_SEQUENCE = 0xFFFFFFFE
SETTLEMENT_LOCKTIME = 0
LOCKTIME_THRESHOLD = 500_000_000  # below: block height, at or above: unix time (BIP65)

SIGHASH_PAYMENT = SIGHASH_SINGLE | SIGHASH_ANYONECANPAY  # 0x83: client signs its change only
SIGHASH_PAYMENT_ALL = SIGHASH_NONE | SIGHASH_ANYONECANPAY  # 0x82: change would be dust, pays all

_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_ORDER = _SECP256K1_ORDER // 2

# Witness sizes used for fee estimates (a DER signature plus sighash byte is at most 73).
_MAX_SIG_LEN = 73


@dataclass(frozen=True)
class Contract:
    """Everything that fixes the funding script."""

    server_pubkey: bytes
    client_pubkey: bytes
    expiry: int

    @property
    def witness_script(self) -> bytes:
        return bytes(
            CScript(
                [
                    OP_IF,
                    self.server_pubkey,
                    OP_CHECKSIGVERIFY,
                    OP_ELSE,
                    self.expiry,
                    OP_CHECKLOCKTIMEVERIFY,
                    OP_DROP,
                    OP_ENDIF,
                    self.client_pubkey,
                    OP_CHECKSIG,
                ]
            )
        )

    @property
    def script_pubkey(self) -> bytes:
        return p2wsh_script(self.witness_script)

    @property
    def expiry_is_time(self) -> bool:
        return self.expiry >= LOCKTIME_THRESHOLD


@dataclass(frozen=True)
class Outpoint:
    txid: str  # big-endian hex, as shown by explorers
    vout: int

    def to_core(self) -> COutPoint:
        return COutPoint(lx(self.txid), self.vout)

    def __str__(self) -> str:
        return f"{self.txid}:{self.vout}"


def check_pubkey(data: bytes, what: str) -> bytes:
    """A compressed secp256k1 point (the only form segwit policy relays)."""
    if len(data) != 33 or data[0] not in (2, 3) or not CPubKey(data).is_fullyvalid:
        raise ChannelError(f"{what} is not a valid compressed public key", code="pubkey_invalid", http_status=400)
    return data


# --- transactions ------------------------------------------------------------------------


def _contract_input(funding: Outpoint) -> CTxIn:
    return CTxIn(funding.to_core(), nSequence=CONTRACT_INPUT_SEQUENCE)


def change_after(deposit: int, paid: int) -> int:
    return deposit - paid


def payment_sighash_type(deposit: int, paid: int) -> int:
    """SINGLE|ANYONECANPAY while the change is above dust, else NONE|ANYONECANPAY (pay all)."""
    return SIGHASH_PAYMENT if change_after(deposit, paid) >= DUST_LIMIT_SAT else SIGHASH_PAYMENT_ALL


def payment_tx(funding: Outpoint, deposit: int, paid: int, refund_script: bytes) -> CTransaction:
    """The transaction a payment signature commits to: the contract input and, unless the
    change is dust, output 0 = change to the client. The server appends its outputs later."""
    vout = []
    if payment_sighash_type(deposit, paid) == SIGHASH_PAYMENT:
        vout.append(CTxOut(change_after(deposit, paid), CScript(refund_script)))
    return CTransaction([_contract_input(funding)], vout, SETTLEMENT_LOCKTIME, TX_VERSION)


def contract_sighash(tx: CTransaction, contract: Contract, deposit: int, hashtype: int) -> bytes:
    """BIP143 digest of input 0 spending the contract (needs the deposit amount)."""
    return SignatureHash(
        CScript(contract.witness_script), tx, 0, hashtype, amount=deposit, sigversion=SIGVERSION_WITNESS_V0
    )


def payment_sighash(contract: Contract, funding: Outpoint, deposit: int, paid: int, refund_script: bytes) -> bytes:
    tx = payment_tx(funding, deposit, paid, refund_script)
    return contract_sighash(tx, contract, deposit, payment_sighash_type(deposit, paid))


@dataclass(frozen=True)
class SettlementPlan:
    """Who gets what at settlement; amounts in satoshis."""

    client_change: int  # output 0, signed by the client (0 when it paid everything)
    server_payout: int  # the owner's share after the fee, to the router's hold output
    client_unused: int  # refund of paid-but-unused credit (0 when below dust: it goes to the fee)
    fee: int


def _varint_len(n: int) -> int:
    return 1 if n < 0xFD else 3


def _output_size(script: bytes) -> int:
    return 8 + _varint_len(len(script)) + len(script)


def settlement_vsize(n_outputs_extra: int, refund_script: bytes, payout_script: bytes, witness_script: bytes) -> int:
    """Upper bound of the settlement's virtual size with every optional output present."""
    return settlement_vsize_for([refund_script, payout_script, refund_script], witness_script)


def settlement_vsize_for(output_scripts: list[bytes], witness_script: bytes) -> int:
    """Virtual size of a settlement with these outputs; signatures counted at their maximum
    (73 bytes with the sighash byte), so the feerate paid is never below the one asked."""
    base = 4 + 1 + 41 + _varint_len(len(output_scripts)) + sum(map(_output_size, output_scripts)) + 4
    witness = 1 + (1 + _MAX_SIG_LEN) * 2 + 1 + 1 + _varint_len(len(witness_script)) + len(witness_script)
    weight = base * 4 + 2 + witness  # 2: segwit marker and flag
    return (weight + 3) // 4


def plan_settlement(
    deposit: int, paid: int, owed: int, feerate_sat_vb: float, refund_script: bytes, payout_script: bytes,
    witness_script: bytes, reserve: int = 0,
) -> SettlementPlan:
    """Split the deposit (docs/protocol.md 3.4, the team's fee policy). The client's signed
    change is fixed; the unused credit `paid - owed` goes back to it in full when it is at
    least dust, else into the fee (the only way a client's sats reach a fee: at most 545);
    the fee is paid from the owner's share `owed` alone. `reserve` is what the owner's output
    must still pay afterwards (the fee of the transaction that moves it on to the payout
    address). Raises `settlement_uneconomic` when the owner's output would then be below dust:
    such a settlement is not broadcast at a loss."""
    if not 0 <= owed:
        raise ValueError("owed must be >= 0")
    owed = min(owed, paid)
    change = change_after(deposit, paid) if payment_sighash_type(deposit, paid) == SIGHASH_PAYMENT else 0
    unused = paid - owed
    if unused < DUST_LIMIT_SAT:
        unused = 0
    # sized with every optional output present: a few vbytes over, never under the feerate
    fee = fee_for(feerate_sat_vb, settlement_vsize(1, refund_script, payout_script, witness_script))
    payout = owed - fee
    if payout - reserve < DUST_LIMIT_SAT:
        raise ChannelError(
            f"the owner's share of {owed} sat does not pay a {fee} sat settlement fee at {feerate_sat_vb:.1f} sat/vB "
            f"(and {reserve} sat to move it on) and keep {DUST_LIMIT_SAT} sat", code="settlement_uneconomic")
    fee = deposit - change - unused - payout  # with a dust credit dropped into it
    return SettlementPlan(client_change=change, server_payout=payout, client_unused=unused, fee=fee)


def tx_vsize(tx: CTransaction) -> int:
    """Virtual size (BIP141) of a built transaction: (stripped x 3 + full) / 4, rounded up."""
    stripped = len(CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion).serialize())
    return (stripped * 3 + len(tx.serialize()) + 3) // 4


def fee_for(feerate_sat_vb: float, vsize: int) -> int:
    """Satoshis a transaction of `vsize` pays at `feerate_sat_vb`, rounded up."""
    return -(-int(feerate_sat_vb * 1000) * vsize // 1000)


def settlement_tx(
    funding: Outpoint, plan: SettlementPlan, refund_script: bytes, payout_script: bytes
) -> CTransaction:
    vout = []
    if plan.client_change:
        vout.append(CTxOut(plan.client_change, CScript(refund_script)))
    if plan.server_payout:
        vout.append(CTxOut(plan.server_payout, CScript(payout_script)))
    if plan.client_unused:
        vout.append(CTxOut(plan.client_unused, CScript(refund_script)))
    if not vout:
        raise ChannelError("nothing left to settle after fees", code="settlement_uneconomic")
    return CTransaction([_contract_input(funding)], vout, SETTLEMENT_LOCKTIME, TX_VERSION)


# --- the router's hold output: how a settlement is fee-bumped --------------------------------
#
# bcoin 1.0.2 refuses any transaction that spends an output already spent in its mempool
# (bad-txns-inputs-spent, with or without --replace-by-fee), and a contract input never
# signals BIP125 (its nSequence is fixed by the client's signature). A settlement is therefore
# bumped by CPFP: the owner's share goes to an output of the router's own channel key (P2WPKH),
# a child spends it with the fee the package needs, and once the settlement is confirmed the
# hold output (or the last child's) is moved on to the owner's payout address.

HOLD_SEQUENCE = 0xFFFFFFFE  # no BIP125 signal: bcoin refuses signalling transactions by default


def hold_script(server_pubkey: bytes) -> bytes:
    return p2wpkh_script(server_pubkey)


def hold_spend_vsize(out_script: bytes) -> int:
    """Virtual size of a hold spend (one P2WPKH input, one output), signature at its maximum."""
    base = 4 + 1 + 41 + 1 + _output_size(out_script) + 4
    witness = 1 + 1 + _MAX_SIG_LEN + 1 + 33
    return (base * 4 + 2 + witness + 3) // 4


def hold_spend_tx(key, outpoint: Outpoint, value: int, out_script: bytes, fee: int) -> CTransaction:
    """Spend the router's hold output `outpoint` (worth `value`) to `out_script`, paying `fee`;
    signed SIGHASH_ALL (BIP143: the script code of P2WPKH is the P2PKH script of the key)."""
    if value - fee < DUST_LIMIT_SAT:
        raise ChannelError(f"a {fee} sat fee leaves less than dust of {value} sat", code="settlement_uneconomic")
    tx = CTransaction([CTxIn(outpoint.to_core(), nSequence=HOLD_SEQUENCE)], [CTxOut(value - fee, CScript(out_script))],
                      0, TX_VERSION)
    digest = SignatureHash(CScript(p2pkh_script(bytes(key.pub))), tx, 0, SIGHASH_ALL, amount=value,
                           sigversion=SIGVERSION_WITNESS_V0)
    return with_witness(tx, [sign(key, digest, SIGHASH_ALL), bytes(key.pub)])


def with_witness(tx: CTransaction, stack: list[bytes]) -> CTransaction:
    wit = CTxWitness([CTxInWitness(CScriptWitness(stack))])
    return CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion, wit)


def settlement_witness(client_sig: bytes, server_sig: bytes, witness_script: bytes) -> list[bytes]:
    return [client_sig, server_sig, b"\x01", witness_script]


def refund_tx(funding: Outpoint, deposit: int, expiry: int, refund_script: bytes, fee: int) -> CTransaction:
    """The client's exit after expiry: nLockTime = expiry and a non-final sequence."""
    if deposit - fee < DUST_LIMIT_SAT:
        raise ChannelError("deposit too small to refund", code="deposit_too_small", http_status=400)
    return CTransaction(
        [_contract_input(funding)], [CTxOut(deposit - fee, CScript(refund_script))], expiry, TX_VERSION
    )


def refund_witness(client_sig: bytes, witness_script: bytes) -> list[bytes]:
    # Empty push selects ELSE; MINIMALIF forbids 0x00 here.
    return [client_sig, b"", witness_script]


def refund_vsize(refund_script: bytes, witness_script: bytes) -> int:
    base = 4 + 1 + 41 + 1 + 8 + 1 + len(refund_script) + 4
    witness = 1 + 1 + _MAX_SIG_LEN + 1 + 1 + 3 + len(witness_script)
    return (base * 4 + 2 + witness + 3) // 4


# --- signatures --------------------------------------------------------------------------


def parse_der_signature(sig: bytes) -> tuple[int, int]:
    """Strict DER (BIP66) -> (r, s); raises ValueError on any deviation."""
    if len(sig) < 8 or len(sig) > 72 or sig[0] != 0x30 or sig[1] != len(sig) - 2:
        raise ValueError("not a DER sequence")
    out = []
    pos = 2
    for _ in range(2):
        if pos + 2 > len(sig) or sig[pos] != 0x02:
            raise ValueError("not a DER integer")
        length = sig[pos + 1]
        body = sig[pos + 2 : pos + 2 + length]
        if length == 0 or len(body) != length:
            raise ValueError("bad integer length")
        if body[0] & 0x80:
            raise ValueError("negative integer")
        if length > 1 and body[0] == 0 and not body[1] & 0x80:
            raise ValueError("integer not minimally encoded")
        out.append(int.from_bytes(body, "big"))
        pos += 2 + length
    if pos != len(sig):
        raise ValueError("trailing bytes")
    r, s = out
    if not (0 < r < _SECP256K1_ORDER and 0 < s < _SECP256K1_ORDER):
        raise ValueError("r or s out of range")
    return r, s


def split_signature(sig_with_type: bytes) -> tuple[bytes, int]:
    """A witness signature is DER followed by one sighash byte."""
    if len(sig_with_type) < 9:
        raise ChannelError("signature too short", code="signature_malformed", http_status=400)
    return sig_with_type[:-1], sig_with_type[-1]


def check_signature(pubkey: bytes, digest: bytes, der: bytes) -> None:
    """Strict DER, low S (relay policy: a high-S signature would strand the settlement) and
    a valid ECDSA signature. Raises ChannelError with a stable code."""
    try:
        _, s = parse_der_signature(der)
    except ValueError as e:
        raise ChannelError(f"signature is not strict DER: {e}", code="signature_malformed", http_status=400) from None
    if s > _HALF_ORDER:
        raise ChannelError("signature has a high S value", code="signature_high_s", http_status=400)
    if not CPubKey(pubkey).verify(digest, der):
        raise ChannelError("signature does not verify", code="signature_invalid", http_status=400)


def sign(key, digest: bytes, hashtype: int) -> bytes:
    """DER (low S, python-bitcoinlib normalises) + sighash byte."""
    return key.sign(digest) + bytes([hashtype])
