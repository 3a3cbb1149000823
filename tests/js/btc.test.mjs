// Bitcoin primitives of the wallet: addresses on every network, transactions, DER, signatures.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import {
  addressToScript, bip143Digest, bytesToHex, derDecode, derEncode, hexToBytes, p2wpkhScript, parseTx, publicKey,
  pushNumber, randomSecret, scriptToAddress, serializeTx, sha256, signDigest, toWif, txid, verifyDigest,
} from '../../bitmesh/portal/static/btc.js';

const V = JSON.parse(readFileSync(new URL('./vectors/channel.json', import.meta.url)));

test('addresses: every kind on every network, both ways, as bitmesh/chain/address.py', () => {
  for (const g of V.addresses.good) {
    assert.equal(bytesToHex(addressToScript(g.address, g.network)), g.script, `${g.kind} on ${g.network}`);
    if (!g.kind.endsWith('-upper')) assert.equal(scriptToAddress(hexToBytes(g.script), g.network), g.address);
  }
  assert.ok(V.addresses.cross.some((x) => x.script === null));
  for (const x of V.addresses.cross) {
    let script = null;
    try {
      script = bytesToHex(addressToScript(x.address, x.network));
    } catch {
      script = null;
    }
    assert.equal(script, x.script, `${x.address} on ${x.network}`);
  }
  for (const b of V.addresses.bad) assert.throws(() => addressToScript(b.address, b.network), b.address);
  assert.throws(() => addressToScript('rb1q', 'nonet'));
});

test('the wallet-generated refund address is P2WPKH with the rb prefix on bcoin regtest', () => {
  const secret = randomSecret();
  const address = scriptToAddress(p2wpkhScript(publicKey(secret)), 'regtest-bcoin');
  assert.match(address, /^rb1q[02-9ac-hj-np-z]{38}$/);
  assert.deepEqual(addressToScript(address, 'regtest-bcoin'), p2wpkhScript(publicKey(secret)));
  assert.notDeepEqual(randomSecret(), secret);
});

test('WIF of a known key (the standard example of key 1)', () => {
  const one = new Uint8Array(32);
  one[31] = 1;
  assert.equal(toWif(one, 'main'), 'KwDiBf89QgGbjEhKnhXJuH7LrciVrZi3qYjgd9M7rFU73sVHnoWn');
});

test('script numbers are minimal pushes', () => {
  const cases = [[1, '51'], [16, '60'], [17, '0111'], [127, '017f'], [128, '028000'], [200, '02c800'],
    [255, '02ff00'], [256, '020001'], [1500, '02dc05'], [32768, '03008000'], [-1, '4f'], [-200, '02c880']];
  for (const [n, hex] of cases) assert.equal(bytesToHex(pushNumber(n)), hex, String(n));
});

test('transactions round-trip, with and without witness, and reject junk', () => {
  for (const f of V.channel.funding_txs) {
    const tx = parseTx(f.hex);
    assert.equal(bytesToHex(serializeTx(tx)), f.hex);
    assert.equal(txid(tx), f.txid);
    assert.equal(txid(parseTx(serializeTx(tx, false))), f.txid);
  }
  const segwit = V.channel.funding_txs[0];
  assert.ok(serializeTx(parseTx(segwit.hex), false).length < segwit.hex.length / 2);
  for (const junk of ['', '00', 'zz', '02000000', segwit.hex.slice(0, -2), segwit.hex + '00']) {
    assert.throws(() => parseTx(junk), junk.slice(0, 12));
  }
});

test('BIP143: the example of the BIP (native P2WPKH, SIGHASH_ALL)', () => {
  // https://github.com/bitcoin/bips/blob/master/bip-0143.mediawiki, "Native P2WPKH"
  const unsigned = '0100000002fff7f7881a8099afa6940d42d1e7f6362bec38171ea3edf433541db4e4ad969f0000000000eeffffffef51e1b804cc89d182d279655c3aa89e815b1b309fe287d9b2b55d57b90ec68a0100000000ffffffff02202cb206000000001976a9148280b37df378db99f66f85c95a783a76ac7a6d5988ac9093510d000000001976a9143bde42dbee7e4dbe6a21b2d50ce2f0167faa815988ac11000000';
  const tx = parseTx(unsigned);
  const scriptCode = hexToBytes('76a9141d0f172a0ecb48aee1be1f2687d2963ae33f71a188ac');
  const digest = bip143Digest(tx, 1, scriptCode, 600000000n, 1);
  assert.equal(bytesToHex(digest), 'c37af31116d1b27caf68aae9e3ac82f1477929014d5b917657d0eb49478cb670');
});

test('DER: strict encoding round-trips; malformed encodings are refused', () => {
  const secret = randomSecret();
  const digest = sha256(new TextEncoder().encode('bitmesh'));
  for (let i = 0; i < 20; i++) {
    const sig = signDigest(secret, sha256(Uint8Array.of(i)), 0x83);
    const der = sig.subarray(0, -1);
    assert.deepEqual(derEncode(derDecode(der)), der);
  }
  const sig = signDigest(secret, digest, 0x01).subarray(0, -1);
  assert.ok(verifyDigest(publicKey(secret), digest, sig));
  assert.ok(!verifyDigest(publicKey(secret), sha256(digest), sig));
  const padded = Uint8Array.from([0x30, sig[1] + 1, ...sig.subarray(2, 4 + sig[3]), 0x00]);
  assert.ok(!verifyDigest(publicKey(secret), digest, padded), 'trailing byte');
  assert.throws(() => derDecode(Uint8Array.of(0x30, 0x06, 0x02, 0x01, 0x80, 0x02, 0x01, 0x01)), /negative/);
  assert.throws(() => derDecode(Uint8Array.of(0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x01)), /minimal/);
  // a high-S twin of a valid signature does not verify (BIP62 / relay policy)
  const compact = derDecode(sig);
  const n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141n;
  const s = BigInt('0x' + bytesToHex(compact.subarray(32)));
  const high = hexToBytes((n - s).toString(16).padStart(64, '0'));
  const twin = derEncode(Uint8Array.from([...compact.subarray(0, 32), ...high]));
  assert.ok(!verifyDigest(publicKey(secret), digest, twin));
});
