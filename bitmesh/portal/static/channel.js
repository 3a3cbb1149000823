// The payer's side of a BitMesh channel (docs/protocol.md), byte for byte as
// bitmesh/channel/contract.py and bitmesh/channel/payer.py build it.
import {
  SIGHASH_ALL, SIGHASH_ANYONECANPAY, SIGHASH_NONE, SIGHASH_SINGLE, addressToScript, bip143Digest, bytesToHex,
  concat, equalBytes, hexToBytes, isValidPublicKey, p2wshScript, parseTx, pushData, pushNumber, scriptToAddress,
  serializeTx, sha256, signDer, signDigest, txid,
} from './btc.js';

export const DUST_LIMIT_SAT = 546;
export const TX_VERSION = 2;
export const CONTRACT_INPUT_SEQUENCE = 0xfffffffe;
export const LOCKTIME_THRESHOLD = 500000000;
export const SIGHASH_PAYMENT = SIGHASH_SINGLE | SIGHASH_ANYONECANPAY; // 0x83
export const SIGHASH_PAYMENT_ALL = SIGHASH_NONE | SIGHASH_ANYONECANPAY; // 0x82
export const REFUND_FEERATE_SAT_VB = 2; // as the reference payer (bitmesh.paying)
export const LIMITS = { minExpiryBlocks: 6, maxExpiryBlocks: 1008 }; // payer.PayerLimits

const MAX_SIG_LEN = 73;

/** A refusal the user should read: `code` is stable, `message` plain words. */
export class WalletError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// --- the contract ----------------------------------------------------------------------------

/** IF <server> CHECKSIGVERIFY ELSE <expiry> CLTV DROP ENDIF <client> CHECKSIG */
export function witnessScript(serverPubkey, clientPubkey, expiry) {
  return concat(
    Uint8Array.of(0x63), pushData(serverPubkey), Uint8Array.of(0xad, 0x67),
    pushNumber(expiry), Uint8Array.of(0xb1, 0x75, 0x68), pushData(clientPubkey), Uint8Array.of(0xac),
  );
}

/** Exact decimal BTC for BIP21 (as bitmesh.channel.wire._btc). */
export function btcAmount(sat) {
  const s = BigInt(sat);
  return `${s / 100000000n}.${(s % 100000000n).toString().padStart(8, '0')}`;
}

export const bip21 = (address, sat) => `bitcoin:${address}?amount=${btcAmount(sat)}`;

/**
 * Rebuild the contract from the server's answer to POST /api/channels and refuse anything that
 * differs from what this payer asked (payer.check_terms). Returns the contract the wallet keeps.
 */
export function checkTerms(terms, { clientPubkey, deposit, refundScript, tipHeight, network }, limits = LIMITS) {
  let serverPubkey;
  let script;
  const expiry = terms && terms.expiry;
  try {
    serverPubkey = hexToBytes(terms.server_pubkey);
    script = hexToBytes(terms.witness_script);
  } catch {
    throw new WalletError('terms_malformed', 'The router answered without a valid key or contract.');
  }
  if (!Number.isSafeInteger(expiry)) throw new WalletError('terms_malformed', 'The router gave no valid expiry.');
  if (!isValidPublicKey(serverPubkey)) throw new WalletError('pubkey_invalid', "The router's key is not valid.");
  if (equalBytes(serverPubkey, clientPubkey)) throw new WalletError('terms_invalid', 'The router reused our key.');
  if (expiry >= LOCKTIME_THRESHOLD) {
    throw new WalletError('terms_invalid', 'The router asked for a time-based expiry; this wallet only accepts block heights.');
  }
  if (!Number.isSafeInteger(tipHeight)) {
    throw new WalletError('terms_invalid', 'The router did not tell the current block height; the expiry cannot be checked.');
  }
  const lo = tipHeight + limits.minExpiryBlocks;
  const hi = tipHeight + limits.maxExpiryBlocks;
  if (!(lo <= expiry && expiry <= hi)) {
    throw new WalletError('expiry_out_of_range', `The channel would expire at block ${expiry}, outside ${lo} to ${hi}.`);
  }
  const expected = witnessScript(serverPubkey, clientPubkey, expiry);
  if (!equalBytes(expected, script)) {
    throw new WalletError('terms_invalid', "The router's contract is not the protocol's contract.");
  }
  const fundingScript = p2wshScript(expected);
  if (terms.funding_script !== bytesToHex(fundingScript)) {
    throw new WalletError('terms_invalid', "The router's funding script does not match the contract.");
  }
  if (terms.deposit !== deposit || terms.refund_script !== bytesToHex(refundScript)) {
    throw new WalletError('terms_invalid', 'The router changed the deposit or the refund address.');
  }
  const fundingAddress = scriptToAddress(fundingScript, network);
  if (terms.funding_address !== undefined && terms.funding_address !== fundingAddress) {
    throw new WalletError('terms_invalid', "The router's funding address does not match the contract.");
  }
  return {
    serverPubkey: bytesToHex(serverPubkey), clientPubkey: bytesToHex(clientPubkey), expiry, deposit,
    witnessScript: bytesToHex(expected), fundingScript: bytesToHex(fundingScript), fundingAddress,
    bip21: bip21(fundingAddress, deposit), refundScript: bytesToHex(refundScript), network,
  };
}

/** scriptPubKey of the refund address, or a WalletError in plain words. */
export function refundScriptOf(address, network) {
  try {
    return addressToScript(address.trim(), network);
  } catch {
    throw new WalletError('address_invalid', `That refund address is not a valid address on ${network}.`);
  }
}

// --- funding -----------------------------------------------------------------------------------

/** The output of the pasted funding transaction that pays the contract exactly the deposit. */
export function findFunding(rawHex, contract) {
  const hex = String(rawHex).replace(/\s+/g, '');
  let tx;
  try {
    tx = parseTx(hex);
  } catch (e) {
    throw new WalletError('tx_malformed', `That is not a raw bitcoin transaction in hex (${e.message}).`);
  }
  const script = hexToBytes(contract.fundingScript);
  const toContract = tx.outputs.map((o, vout) => ({ ...o, vout })).filter((o) => equalBytes(o.script, script));
  if (!toContract.length) {
    throw new WalletError('funding_script_mismatch', 'This transaction does not pay the channel address.');
  }
  const exact = toContract.find((o) => o.value === BigInt(contract.deposit));
  if (!exact) {
    throw new WalletError('funding_amount_mismatch',
      `This transaction pays ${toContract[0].value} sat to the channel, not the deposit of ${contract.deposit} sat.`);
  }
  return { txid: txid(tx), vout: exact.vout, hex: hex.toLowerCase() };
}

// --- spends of the contract --------------------------------------------------------------------

const contractInput = (funding) => ({
  txid: funding.txid, vout: funding.vout, scriptSig: new Uint8Array(0), sequence: CONTRACT_INPUT_SEQUENCE, witness: [],
});

export const paymentSighashType = (deposit, paid) =>
  (deposit - paid >= DUST_LIMIT_SAT ? SIGHASH_PAYMENT : SIGHASH_PAYMENT_ALL);

/** contract.payment_tx: the contract input and, unless the change is dust, the change at output 0. */
export function paymentTx(funding, deposit, paid, refundScript) {
  const outputs = [];
  if (paymentSighashType(deposit, paid) === SIGHASH_PAYMENT) {
    outputs.push({ value: BigInt(deposit - paid), script: refundScript });
  }
  return { version: TX_VERSION, inputs: [contractInput(funding)], outputs, locktime: 0 };
}

export const contractSighash = (tx, contract, hashtype) =>
  bip143Digest(tx, 0, hexToBytes(contract.witnessScript), contract.deposit, hashtype);

/** The body of POST /api/channels/{id}/payments for a new total `amount`. */
export function paymentMessage(secret, contract, funding, amount) {
  const { deposit } = contract;
  if (!Number.isSafeInteger(amount) || amount <= 0 || amount > deposit) {
    throw new WalletError('payment_invalid', `Cannot pay ${amount} sat from a deposit of ${deposit} sat.`);
  }
  if (deposit - amount > 0 && deposit - amount < DUST_LIMIT_SAT) {
    throw new WalletError('payment_dust_change',
      `A change of ${deposit - amount} sat would go to miners; pay the whole deposit instead.`);
  }
  const tx = paymentTx(funding, deposit, amount, hexToBytes(contract.refundScript));
  const hashtype = paymentSighashType(deposit, amount);
  const signature = signDigest(secret, contractSighash(tx, contract, hashtype), hashtype);
  return { amount, tx: bytesToHex(serializeTx(tx, false)), signature: bytesToHex(signature) };
}

/** payer.PayerChannel.next_amount: owed plus one prepay step, all of it when the change is dust. */
export function nextAmount(deposit, owed, prepayStep) {
  let amount = Math.min(deposit, owed + prepayStep);
  if (deposit - amount < DUST_LIMIT_SAT) amount = deposit;
  return amount;
}

/** Pay when the credit (paid - owed) falls below half a prepay step and there is more to pay. */
export function paymentDue(deposit, paid, owed, prepayStep) {
  if (2 * (paid - owed) >= prepayStep) return null;
  const amount = nextAmount(deposit, owed, prepayStep);
  return amount > paid ? amount : null;
}

// --- holding the router to its offer ----------------------------------------------------------

/** What the wallet keeps from the offer it opened on (payer.offer_terms): later answers never change it. */
export function offerTerms(offer) {
  const step = offer && offer.prepay_step_sat;
  const t = offer && offer.tariff;
  const metered = offer && offer.metered !== undefined ? offer.metered : true;
  const ok = (n) => Number.isSafeInteger(n) && n >= 0;
  if (!Number.isSafeInteger(step) || step <= 0 || !t || !ok(t.sat_per_mb) || !ok(t.sat_per_minute) ||
      !(t.sat_per_mb || t.sat_per_minute) || typeof metered !== 'boolean') {
    throw new WalletError('terms_malformed', 'The router offers no valid prepay step or price.');
  }
  return { prepayStep: step, tariff: { sat_per_mb: t.sat_per_mb, sat_per_minute: t.sat_per_minute }, metered };
}

/** tariff.Tariff.owed: satoshis for this usage, rounded up (exact, in BigInt). */
export function tariffOwed(tariff, bytesUsed, secondsUsed) {
  const num = BigInt(bytesUsed) * BigInt(tariff.sat_per_mb) * 60n +
    BigInt(secondsUsed) * BigInt(tariff.sat_per_minute) * 1000000n;
  return Number((num + 59999999n) / 60000000n);
}

/** payer.MeterBounds: no link is faster; the router's meter may run this far ahead. */
export const METER_BOUNDS = { maxBytesPerSecond: 300000000, slackSeconds: 10 };

/** payer.unmetered_owed: an unmetered router's `owed` is all that was paid; pay by our own clock. */
export const unmeteredOwed = (tariff, elapsedSeconds) =>
  (elapsedSeconds == null ? 0 : tariffOwed(tariff, 0, Math.floor(Math.max(0, elapsedSeconds))));

/**
 * payer.check_meter: the router's `owed` from GET /api/session when the time since our first
 * payment, the bytes and the tariff fixed at open account for it; a WalletError otherwise.
 */
export function checkMeter(report, { tariff, signedMax, elapsedSeconds }, bounds = METER_BOUNDS) {
  const figures = ['owed', 'bytes_used', 'seconds_used'].map((k) => report && report[k]);
  if (!figures.every((v) => Number.isSafeInteger(v) && v >= 0)) {
    throw new WalletError('meter_malformed', "The router's session lacks its usage figures.");
  }
  const [owed, bytesUsed, secondsUsed] = figures;
  const no = (why) => new WalletError('owed_implausible', `${why} This page does not pay it.`);
  if (owed > signedMax) throw no(`The router says ${owed} sat are owed, more than the ${signedMax} sat this page ever signed.`);
  if (elapsedSeconds == null) {
    if (owed) throw no(`The router says ${owed} sat are owed before any payment.`);
    return 0;
  }
  const window = Math.max(0, elapsedSeconds) + bounds.slackSeconds;
  if (secondsUsed > window) {
    throw no(`The router counts ${secondsUsed} s of use, but only ${Math.round(elapsedSeconds)} s passed since the first payment.`);
  }
  if (bytesUsed > bounds.maxBytesPerSecond * window) {
    throw no(`The router counts ${bytesUsed} bytes in ${Math.round(elapsedSeconds)} s, faster than any link.`);
  }
  const billable = tariffOwed(tariff, bytesUsed, secondsUsed);
  if (owed > billable) {
    throw no(`The router says ${owed} sat are owed, but what it measured costs ${billable} sat at the price agreed when the channel opened.`);
  }
  return owed;
}

/** Default Esplora explorers a wallet may reach through the walled garden, per network. */
export const DEFAULT_EXPLORERS = {
  main: 'https://mempool.space/api', test: 'https://mempool.space/testnet/api', signet: 'https://mempool.space/signet/api',
};
const NO_MONEY = new Set(['regtest', 'regtest-bcoin']); // test chains: no coins of value, no public explorer

/**
 * The tip height the expiry is judged against: the explorer's, never only the router's word
 * (on a regtest chain, with no money at stake and no public explorer, the router's, said so).
 */
export function chooseTip(networkName, explorerTip, routerTip, explorerError = '') {
  if (Number.isSafeInteger(explorerTip) && explorerTip > 0) return { tip: explorerTip, source: 'explorer' };
  if (NO_MONEY.has(networkName) && Number.isSafeInteger(routerTip)) return { tip: routerTip, source: 'router' };
  throw new WalletError('tip_unchecked',
    "This page cannot check the channel's expiry: no block explorer answered" +
    `${explorerError ? ` (${explorerError})` : ''}. Set one reachable from this Wi-Fi (the router's owner can add it ` +
    'to the walled garden); the router\'s own word on the block height is not enough.');
}

export function refundVsize(refundScript, script) {
  const base = 4 + 1 + 41 + 1 + 8 + 1 + refundScript.length + 4;
  const witness = 1 + 1 + MAX_SIG_LEN + 1 + 1 + 3 + script.length;
  return Math.floor((base * 4 + 2 + witness + 3) / 4);
}

/** Refund after expiry (protocol 3.2), signed SIGHASH_ALL; the hex to keep. */
export function signedRefund(secret, contract, funding, feerate = REFUND_FEERATE_SAT_VB) {
  const refundScript = hexToBytes(contract.refundScript);
  const script = hexToBytes(contract.witnessScript);
  const fee = Math.floor(feerate * refundVsize(refundScript, script)) + 1;
  if (contract.deposit - fee < DUST_LIMIT_SAT) throw new WalletError('deposit_too_small', 'The deposit is too small to refund.');
  const tx = {
    version: TX_VERSION, inputs: [contractInput(funding)],
    outputs: [{ value: BigInt(contract.deposit - fee), script: refundScript }], locktime: contract.expiry,
  };
  const sig = signDigest(secret, contractSighash(tx, contract, SIGHASH_ALL), SIGHASH_ALL);
  tx.inputs[0].witness = [sig, new Uint8Array(0), script]; // empty push selects ELSE (MINIMALIF)
  return { tx, hex: bytesToHex(serializeTx(tx, true)), txid: txid(tx), fee };
}

// --- proofs: what lets this page, and nobody else, read its session and close its channel --------

export const PROOF_ACTIONS = ['session', 'close'];

/** wire.proof_digest: SHA256 of the ASCII text "bitmesh proof 1 <action> <channel id>". */
export function proofDigest(action, channelId) {
  if (!PROOF_ACTIONS.includes(action)) throw new WalletError('proof_action', `No proof for ${action}.`);
  return sha256(new TextEncoder().encode(`bitmesh proof 1 ${action} ${channelId}`));
}

/** The channel's proof for `action`: its client key's signature (hex DER, low S, no sighash byte). */
export const channelProof = (secret, action, channelId) => bytesToHex(signDer(secret, proofDigest(action, channelId)));
