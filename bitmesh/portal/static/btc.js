// Bitcoin primitives for the splash-page wallet: bytes, scripts, addresses, transactions,
// BIP143 digests and low-S DER signatures. Pure functions; the audited libraries do the
// cryptography (noble-secp256k1, noble-hashes, scure-base), this file only arranges bytes.
import * as secp from './vendor/noble-secp256k1/index.js';
import { sha256 } from './vendor/noble-hashes/sha2.js';
import { ripemd160 } from './vendor/noble-hashes/legacy.js';
import { hmac } from './vendor/noble-hashes/hmac.js';
import { bech32, bech32m, createBase58check } from './vendor/scure-base/index.js';

// Synchronous RFC6979 signing (crypto.subtle does not exist on a plain-http portal page).
secp.hashes.sha256 = sha256;
secp.hashes.hmacSha256 = (key, msg) => hmac(sha256, key, msg);

const base58check = createBase58check(sha256);

// --- bytes -------------------------------------------------------------------------------

export function hexToBytes(hex) {
  if (typeof hex !== 'string' || hex.length % 2 || !/^[0-9a-fA-F]*$/.test(hex)) {
    throw new Error('not a hexadecimal string');
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(i * 2, 2), 16);
  return out;
}

export function bytesToHex(bytes) {
  let s = '';
  for (const b of bytes) s += b.toString(16).padStart(2, '0');
  return s;
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

export const equalBytes = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);

export function u32le(n) {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, n, true);
  return out;
}

export function u64le(n) {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(n), true);
  return out;
}

export function varint(n) {
  if (n < 0xfd) return Uint8Array.of(n);
  if (n <= 0xffff) return Uint8Array.of(0xfd, n & 0xff, n >> 8);
  return concat(Uint8Array.of(0xfe), u32le(n));
}

export const sha256d = (data) => sha256(sha256(data));
export const hash160 = (data) => ripemd160(sha256(data));
export { sha256 };

// --- networks and addresses ----------------------------------------------------------------

// Mirrors bitmesh/chain/address.py (bcoin's regtest has its own prefixes).
export const NETWORKS = {
  main: { hrp: 'bc', p2pkh: 0x00, p2sh: 0x05, wif: 0x80 },
  test: { hrp: 'tb', p2pkh: 0x6f, p2sh: 0xc4, wif: 0xef },
  signet: { hrp: 'tb', p2pkh: 0x6f, p2sh: 0xc4, wif: 0xef },
  regtest: { hrp: 'bcrt', p2pkh: 0x6f, p2sh: 0xc4, wif: 0xef },
  'regtest-bcoin': { hrp: 'rb', p2pkh: 0x3c, p2sh: 0x26, wif: 0x5a },
};

export function network(name) {
  const net = NETWORKS[name];
  if (!net) throw new Error(`unknown network ${JSON.stringify(name)}`);
  return net;
}

export const p2wpkhScript = (pubkey) => concat(Uint8Array.of(0x00, 0x14), hash160(pubkey));
export const p2pkhScript = (pubkey) => concat(Uint8Array.of(0x76, 0xa9, 0x14), hash160(pubkey), Uint8Array.of(0x88, 0xac));
export const p2wshScript = (witnessScript) => concat(Uint8Array.of(0x00, 0x20), sha256(witnessScript));

function witnessProgram(script) {
  const n = script.length;
  if (n < 4 || n > 42 || script[1] !== n - 2) return null;
  if (script[0] === 0) return { version: 0, program: script.subarray(2) };
  if (script[0] >= 0x51 && script[0] <= 0x60) return { version: script[0] - 0x50, program: script.subarray(2) };
  return null;
}

export function scriptToAddress(script, networkName) {
  const net = network(networkName);
  const wp = witnessProgram(script);
  if (wp) {
    const words = [wp.version, ...bech32.toWords(wp.program)];
    return (wp.version === 0 ? bech32 : bech32m).encode(net.hrp, words, 90);
  }
  if (script.length === 25 && script[0] === 0x76 && script[1] === 0xa9 && script[2] === 0x14 &&
      script[23] === 0x88 && script[24] === 0xac) {
    return base58check.encode(concat(Uint8Array.of(net.p2pkh), script.subarray(3, 23)));
  }
  if (script.length === 23 && script[0] === 0xa9 && script[1] === 0x14 && script[22] === 0x87) {
    return base58check.encode(concat(Uint8Array.of(net.p2sh), script.subarray(2, 22)));
  }
  throw new Error('script has no address form');
}

function decodeSegwit(address, hrp) {
  if (address.toLowerCase() !== address && address.toUpperCase() !== address) return null;
  const addr = address.toLowerCase();
  if (!addr.startsWith(hrp + '1')) return null;
  for (const [codec, isM] of [[bech32, false], [bech32m, true]]) {
    let decoded;
    try {
      decoded = codec.decode(addr, 90);
    } catch {
      continue;
    }
    if (decoded.prefix !== hrp || decoded.words.length < 1) return null;
    const version = decoded.words[0];
    if (version > 16 || (version === 0) === isM) return null;
    let program;
    try {
      program = bech32.fromWords(decoded.words.slice(1));
    } catch {
      return null;
    }
    if (program.length < 2 || program.length > 40) return null;
    if (version === 0 && program.length !== 20 && program.length !== 32) return null;
    return concat(Uint8Array.of(version ? 0x50 + version : 0, program.length), program);
  }
  return null;
}

/** scriptPubKey of `address` on `networkName`; throws when it is not an address of that network. */
export function addressToScript(address, networkName) {
  const net = network(networkName);
  if (typeof address !== 'string' || !address || address.length > 90) throw new Error('address must not be empty');
  const segwit = decodeSegwit(address, net.hrp);
  if (segwit) return segwit;
  let data;
  try {
    data = base58check.decode(address);
  } catch {
    throw new Error(`${address} is not a valid address on ${networkName}`);
  }
  if (data.length === 21 && data[0] === net.p2pkh) {
    return concat(Uint8Array.of(0x76, 0xa9, 0x14), data.subarray(1), Uint8Array.of(0x88, 0xac));
  }
  if (data.length === 21 && data[0] === net.p2sh) {
    return concat(Uint8Array.of(0xa9, 0x14), data.subarray(1), Uint8Array.of(0x87));
  }
  throw new Error(`${address} is not a valid address on ${networkName}`);
}

/** WIF of a compressed-key secret, so a refund key can be imported into another wallet. */
export const toWif = (secret, networkName) =>
  base58check.encode(concat(Uint8Array.of(network(networkName).wif), secret, Uint8Array.of(0x01)));

// --- scripts -------------------------------------------------------------------------------

export function pushData(data) {
  const n = data.length;
  if (n < 0x4c) return concat(Uint8Array.of(n), data);
  if (n <= 0xff) return concat(Uint8Array.of(0x4c, n), data);
  if (n <= 0xffff) return concat(Uint8Array.of(0x4d, n & 0xff, n >> 8), data);
  throw new Error('push too large');
}

/** Minimal push of a script number (as python-bitcoinlib's CScript pushes an int). */
export function pushNumber(n) {
  if (!Number.isSafeInteger(n)) throw new Error('script number must be an integer');
  if (n === 0) return Uint8Array.of(0x00);
  if (n === -1) return Uint8Array.of(0x4f);
  if (n >= 1 && n <= 16) return Uint8Array.of(0x50 + n);
  const bytes = [];
  let abs = Math.abs(n);
  while (abs > 0) {
    bytes.push(abs & 0xff);
    abs = Math.floor(abs / 256);
  }
  if (bytes[bytes.length - 1] & 0x80) bytes.push(n < 0 ? 0x80 : 0x00);
  else if (n < 0) bytes[bytes.length - 1] |= 0x80;
  return pushData(Uint8Array.from(bytes));
}

// --- transactions --------------------------------------------------------------------------
// A transaction: {version, inputs: [{txid (hex, big-endian), vout, scriptSig, sequence,
// witness: [Uint8Array]}], outputs: [{value (BigInt sat), script}], locktime}.

class Reader {
  constructor(bytes) {
    this.b = bytes;
    this.pos = 0;
  }
  take(n) {
    if (n < 0 || this.pos + n > this.b.length) throw new Error('transaction is truncated');
    const out = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  byte() {
    return this.take(1)[0];
  }
  u32() {
    const b = this.take(4);
    return (b[0] | (b[1] << 8) | (b[2] << 16)) + b[3] * 2 ** 24;
  }
  u64() {
    const b = this.take(8);
    let v = 0n;
    for (let i = 7; i >= 0; i--) v = (v << 8n) | BigInt(b[i]);
    return v;
  }
  varint() {
    const first = this.byte();
    if (first < 0xfd) return first;
    if (first === 0xfd) return this.take(1)[0] | (this.take(1)[0] << 8);
    if (first === 0xfe) return this.u32();
    throw new Error('length too large');
  }
  bytes() {
    return this.take(this.varint());
  }
}

export function parseTx(raw) {
  const bytes = typeof raw === 'string' ? hexToBytes(raw.trim()) : raw;
  const r = new Reader(bytes);
  const version = r.u32();
  let segwit = false;
  if (bytes[r.pos] === 0x00 && bytes[r.pos + 1] === 0x01) {
    segwit = true;
    r.take(2);
  }
  const inputs = [];
  const nIn = r.varint();
  if (nIn > 10000) throw new Error('too many inputs');
  for (let i = 0; i < nIn; i++) {
    const txid = bytesToHex(r.take(32).slice().reverse());
    inputs.push({ txid, vout: r.u32(), scriptSig: r.bytes().slice(), sequence: r.u32(), witness: [] });
  }
  const outputs = [];
  const nOut = r.varint();
  if (nOut > 10000) throw new Error('too many outputs');
  for (let i = 0; i < nOut; i++) outputs.push({ value: r.u64(), script: r.bytes().slice() });
  if (segwit) {
    for (const input of inputs) {
      const n = r.varint();
      for (let k = 0; k < n; k++) input.witness.push(r.bytes().slice());
    }
  }
  const locktime = r.u32();
  if (r.pos !== bytes.length) throw new Error('trailing bytes after the transaction');
  if (!inputs.length) throw new Error('transaction has no inputs');
  return { version, inputs, outputs, locktime };
}

const outpointBytes = (input) => concat(hexToBytes(input.txid).reverse(), u32le(input.vout));
const outputBytes = (out) => concat(u64le(out.value), varint(out.script.length), out.script);

export function serializeTx(tx, withWitness = true) {
  const segwit = withWitness && tx.inputs.some((i) => i.witness && i.witness.length);
  const parts = [u32le(tx.version)];
  if (segwit) parts.push(Uint8Array.of(0x00, 0x01));
  parts.push(varint(tx.inputs.length));
  for (const i of tx.inputs) parts.push(outpointBytes(i), varint(i.scriptSig.length), i.scriptSig, u32le(i.sequence));
  parts.push(varint(tx.outputs.length));
  for (const o of tx.outputs) parts.push(outputBytes(o));
  if (segwit) {
    for (const i of tx.inputs) {
      const stack = i.witness || [];
      parts.push(varint(stack.length));
      for (const item of stack) parts.push(varint(item.length), item);
    }
  }
  parts.push(u32le(tx.locktime));
  return concat(...parts);
}

/** Big-endian hex txid: double SHA-256 of the serialization without witness, reversed. */
export const txid = (tx) => bytesToHex(sha256d(serializeTx(tx, false)).reverse());

// --- signatures ----------------------------------------------------------------------------

export const SIGHASH_ALL = 0x01;
export const SIGHASH_NONE = 0x02;
export const SIGHASH_SINGLE = 0x03;
export const SIGHASH_ANYONECANPAY = 0x80;

/** BIP143 (segwit v0) signature digest of input `index`. */
export function bip143Digest(tx, index, scriptCode, amount, hashtype) {
  const zero = new Uint8Array(32);
  const base = hashtype & 0x1f;
  const anyone = (hashtype & SIGHASH_ANYONECANPAY) !== 0;
  const hashPrevouts = anyone ? zero : sha256d(concat(...tx.inputs.map(outpointBytes)));
  const hashSequence = anyone || base === SIGHASH_SINGLE || base === SIGHASH_NONE
    ? zero : sha256d(concat(...tx.inputs.map((i) => u32le(i.sequence))));
  let hashOutputs = zero;
  if (base !== SIGHASH_SINGLE && base !== SIGHASH_NONE) hashOutputs = sha256d(concat(...tx.outputs.map(outputBytes)));
  else if (base === SIGHASH_SINGLE && index < tx.outputs.length) hashOutputs = sha256d(outputBytes(tx.outputs[index]));
  const input = tx.inputs[index];
  return sha256d(concat(
    u32le(tx.version), hashPrevouts, hashSequence, outpointBytes(input),
    varint(scriptCode.length), scriptCode, u64le(amount), u32le(input.sequence),
    hashOutputs, u32le(tx.locktime), u32le(hashtype),
  ));
}

function derInt(bytes32) {
  let i = 0;
  while (i < bytes32.length - 1 && bytes32[i] === 0) i++;
  let v = bytes32.subarray(i);
  if (v[0] & 0x80) v = concat(Uint8Array.of(0), v);
  return concat(Uint8Array.of(0x02, v.length), v);
}

/** Strict DER (BIP66) of a 64-byte compact (r || s) signature. */
export function derEncode(compact) {
  const body = concat(derInt(compact.subarray(0, 32)), derInt(compact.subarray(32, 64)));
  return concat(Uint8Array.of(0x30, body.length), body);
}

/** Strict DER -> 64-byte compact; throws on any deviation (the same rules as contract.py). */
export function derDecode(der) {
  if (der.length < 8 || der.length > 72 || der[0] !== 0x30 || der[1] !== der.length - 2) throw new Error('not DER');
  const out = [];
  let pos = 2;
  for (let k = 0; k < 2; k++) {
    if (der[pos] !== 0x02) throw new Error('not a DER integer');
    const len = der[pos + 1];
    const body = der.subarray(pos + 2, pos + 2 + len);
    if (len === 0 || body.length !== len || len > 33) throw new Error('bad DER integer length');
    if (body[0] & 0x80) throw new Error('negative DER integer');
    if (len > 1 && body[0] === 0 && !(body[1] & 0x80)) throw new Error('DER integer not minimal');
    const trimmed = body[0] === 0 ? body.subarray(1) : body;
    if (trimmed.length > 32) throw new Error('DER integer too large');
    const padded = new Uint8Array(32);
    padded.set(trimmed, 32 - trimmed.length);
    out.push(padded);
    pos += 2 + len;
  }
  if (pos !== der.length) throw new Error('trailing bytes after DER');
  return concat(...out);
}

export const isValidSecret = (secret) => secp.utils.isValidSecretKey(secret);

export function randomSecret() {
  for (;;) {
    const secret = crypto.getRandomValues(new Uint8Array(32));
    if (isValidSecret(secret)) return secret;
  }
}

export const publicKey = (secret) => secp.getPublicKey(secret, true);

export function isValidPublicKey(pubkey) {
  if (pubkey.length !== 33 || (pubkey[0] !== 2 && pubkey[0] !== 3)) return false;
  try {
    secp.Point.fromBytes(pubkey).assertValidity();
    return true;
  } catch {
    return false;
  }
}

/** DER (RFC6979, low S) over a 32-byte digest, with no sighash byte (a channel proof). */
export function signDer(secret, digest) {
  return derEncode(secp.sign(digest, secret, { prehash: false, lowS: true }));
}

/** DER (RFC6979, low S) || sighash byte, over a 32-byte digest. */
export function signDigest(secret, digest, hashtype) {
  return concat(signDer(secret, digest), Uint8Array.of(hashtype));
}

/** True when `der` (without the sighash byte) is a valid low-S signature of `digest`. */
export function verifyDigest(pubkey, digest, der) {
  let compact;
  try {
    compact = derDecode(der);
  } catch {
    return false;
  }
  return secp.verify(compact, digest, pubkey, { prehash: false, lowS: true });
}
