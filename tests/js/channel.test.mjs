// The wallet's transactions against the Python reference (vectors/channel.json, written by
// make_vectors.py from bitmesh.channel.contract/payer). Run: node --test tests/js/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import {
  bytesToHex, derDecode, hexToBytes, parseTx, publicKey, serializeTx, txid, verifyDigest,
} from '../../bitmesh/portal/static/btc.js';
import {
  METER_BOUNDS, WalletError, bip21, btcAmount, checkMeter, checkTerms, chooseTip, contractSighash, findFunding,
  nextAmount, offerTerms, paymentDue, paymentMessage, paymentSighashType, paymentTx, refundScriptOf, refundVsize,
  signedRefund, tariffOwed, unmeteredOwed, witnessScript,
} from '../../bitmesh/portal/static/channel.js';

const V = JSON.parse(readFileSync(new URL('./vectors/channel.json', import.meta.url)));
const CH = V.channel;
const secret = hexToBytes(V.keys.client_secret);
const clientPubkey = hexToBytes(V.keys.client_pubkey);

function contract() {
  return checkTerms(CH.terms, {
    clientPubkey, deposit: CH.deposit, refundScript: refundScriptOf(CH.refund_address, CH.network),
    tipHeight: CH.tip_height, network: CH.network,
  });
}

test('the client key is the one the vectors were made with', () => {
  assert.equal(bytesToHex(publicKey(secret)), V.keys.client_pubkey);
});

test('witness script, funding script and funding address for every script-number size', () => {
  const server = hexToBytes(V.keys.server_pubkey);
  for (const k of V.contracts) {
    const script = witnessScript(server, clientPubkey, k.expiry);
    assert.equal(bytesToHex(script), k.witness_script, `expiry ${k.expiry}`);
  }
  const c = contract();
  const k = V.contracts.find((x) => x.expiry === CH.expiry);
  assert.equal(c.witnessScript, k.witness_script);
  assert.equal(c.fundingScript, k.funding_script);
  assert.equal(c.fundingAddress, k.funding_address[CH.network]);
  assert.equal(c.bip21, CH.terms.bip21);
});

test('checkTerms accepts the reference terms and refuses each deviation', () => {
  const ok = contract();
  assert.equal(ok.expiry, CH.expiry);
  const base = {
    clientPubkey, deposit: CH.deposit, refundScript: refundScriptOf(CH.refund_address, CH.network),
    tipHeight: CH.tip_height, network: CH.network,
  };
  const other = V.contracts.find((x) => x.expiry === 200);
  const refusals = [
    [{ server_pubkey: V.keys.client_pubkey }, {}, 'terms_invalid'], // our own key
    [{ server_pubkey: '02' + '00'.repeat(32) }, {}, 'pubkey_invalid'],
    [{ server_pubkey: 'zz' }, {}, 'terms_malformed'],
    [{ expiry: CH.expiry + 1 }, {}, 'terms_invalid'], // script no longer matches
    [{ witness_script: other.witness_script }, {}, 'terms_invalid'],
    [{ funding_script: other.funding_script }, {}, 'terms_invalid'],
    [{ funding_address: other.funding_address[CH.network] }, {}, 'terms_invalid'],
    [{ deposit: CH.deposit + 1 }, {}, 'terms_invalid'],
    [{ refund_script: '0014' + '11'.repeat(20) }, {}, 'terms_invalid'],
    [{ expiry: 1700000000 }, {}, 'terms_invalid'], // unix time
    [{}, { tipHeight: CH.expiry - 5 }, 'expiry_out_of_range'], // expires in 5 blocks
    [{}, { tipHeight: CH.expiry - 1009 }, 'expiry_out_of_range'], // locked for more than a week
    [{}, { tipHeight: undefined }, 'terms_invalid'],
  ];
  for (const [termsPatch, argsPatch, code] of refusals) {
    assert.throws(() => checkTerms({ ...CH.terms, ...termsPatch }, { ...base, ...argsPatch }),
      (e) => e instanceof WalletError && e.code === code, JSON.stringify([termsPatch, argsPatch]));
  }
  // the window's edges are inclusive, as payer.check_terms
  checkTerms(CH.terms, { ...base, tipHeight: CH.expiry - 6 });
  checkTerms(CH.terms, { ...base, tipHeight: CH.expiry - 1008 });
});

test('a funding transaction is found by script and exact amount; its txid excludes the witness', () => {
  const c = contract();
  for (const f of CH.funding_txs) {
    if (f.ok) {
      const found = findFunding(f.hex, c);
      assert.deepEqual([found.txid, found.vout], [f.txid, f.vout]);
      assert.equal(bytesToHex(serializeTx(parseTx(f.hex))), f.hex); // round trip, witness kept
    } else {
      assert.throws(() => findFunding(f.hex, c), (e) => e.code === f.code);
    }
  }
  // with whitespace and line breaks as pasted from a wallet
  const spaced = CH.funding_txs[0].hex.replace(/(.{64})/g, '$1\n ');
  assert.equal(findFunding(spaced, c).txid, CH.funding_txs[0].txid);
  assert.throws(() => findFunding('0200', c), (e) => e.code === 'tx_malformed');
  assert.throws(() => findFunding(CH.funding_txs[0].hex + '00', c), (e) => e.code === 'tx_malformed');
  assert.throws(() => findFunding(CH.refund.python_signed_tx, c), (e) => e.code === 'funding_script_mismatch');
});

test('payment transactions, sighash types and BIP143 digests equal the reference', () => {
  const c = contract();
  const refundScript = hexToBytes(c.refundScript);
  for (const p of CH.payments) {
    const type = paymentSighashType(CH.deposit, p.amount);
    assert.equal(type, p.sighash_type, `amount ${p.amount}`);
    const tx = paymentTx(CH.funding, CH.deposit, p.amount, refundScript);
    assert.equal(bytesToHex(serializeTx(tx, false)), p.tx, `tx for ${p.amount}`);
    assert.equal(bytesToHex(contractSighash(tx, c, type)), p.digest, `digest for ${p.amount}`);
  }
  assert.ok(CH.payments.some((p) => p.sighash_type === 0x83) && CH.payments.some((p) => p.sighash_type === 0x82));
});

test('payment messages carry the reference tx and a low-S DER signature of the digest', () => {
  const c = contract();
  for (const p of CH.payments) {
    const msg = paymentMessage(secret, c, CH.funding, p.amount);
    assert.equal(msg.amount, p.amount);
    assert.equal(msg.tx, p.message_tx);
    const sig = hexToBytes(msg.signature);
    assert.equal(sig[sig.length - 1], p.sighash_type);
    const der = sig.subarray(0, -1);
    assert.ok(verifyDigest(clientPubkey, hexToBytes(p.digest), der));
    const s = BigInt('0x' + bytesToHex(derDecode(der).subarray(32)));
    assert.ok(s <= 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0n, 'low S');
    // RFC6979: the same message twice is the same signature
    assert.equal(paymentMessage(secret, c, CH.funding, p.amount).signature, msg.signature);
    // and the Python reference's signature verifies here too
    const py = hexToBytes(p.python_signature);
    assert.ok(verifyDigest(clientPubkey, hexToBytes(p.digest), py.subarray(0, -1)));
    assert.ok(!verifyDigest(hexToBytes(V.keys.server_pubkey), hexToBytes(p.digest), py.subarray(0, -1)));
  }
  assert.throws(() => paymentMessage(secret, c, CH.funding, CH.deposit + 1), WalletError);
  assert.throws(() => paymentMessage(secret, c, CH.funding, 0), WalletError);
  // a change below dust would go to miners: refused here as by the Python payer and the router
  assert.equal(CH.dust_change_refusals.length, 2);
  for (const { amount, code } of CH.dust_change_refusals) {
    assert.throws(() => paymentMessage(secret, c, CH.funding, amount), (e) => e.code === code && code === 'payment_dust_change');
  }
});

test('the meter is checked as payer.check_meter checks it', () => {
  const M = V.meter;
  assert.deepEqual(METER_BOUNDS, { maxBytesPerSecond: M.bounds.max_bytes_per_second, slackSeconds: M.bounds.slack_seconds });
  for (const v of M.tariff_owed) assert.equal(tariffOwed(v.tariff, v.bytes, v.seconds), v.owed, JSON.stringify(v));
  for (const v of M.unmetered_owed) assert.equal(unmeteredOwed(v.tariff, v.elapsed), v.owed, JSON.stringify(v));
  assert.ok(M.checks.some((v) => v.code === 'owed_implausible') && M.checks.some((v) => v.owed > 0));
  for (const v of M.checks) {
    const args = { tariff: v.tariff, signedMax: v.signed_max, elapsedSeconds: v.elapsed };
    const what = JSON.stringify(v);
    if (v.code) assert.throws(() => checkMeter(v.report, args), (e) => e instanceof WalletError && e.code === v.code, what);
    else assert.equal(checkMeter(v.report, args), v.owed, what);
  }
});

test('the step and the price are the offer\'s, kept at open', () => {
  const offer = { prepay_step_sat: 1000, tariff: { sat_per_mb: 10, sat_per_minute: 0 }, metered: true };
  assert.deepEqual(offerTerms(offer), { prepayStep: 1000, tariff: { sat_per_mb: 10, sat_per_minute: 0 }, metered: true });
  assert.equal(offerTerms({ ...offer, metered: undefined }).metered, true); // a router that says nothing meters
  assert.equal(offerTerms({ ...offer, metered: false }).metered, false);
  for (const bad of [{ prepay_step_sat: 0 }, { prepay_step_sat: '1000' }, { tariff: null },
    { tariff: { sat_per_mb: 0, sat_per_minute: 0 } }, { tariff: { sat_per_mb: -1, sat_per_minute: 5 } }, { metered: 'yes' }]) {
    assert.throws(() => offerTerms({ ...offer, ...bad }), (e) => e.code === 'terms_malformed', JSON.stringify(bad));
  }
  // a session answer asking for the whole deposit as the step changes nothing: the wallet pays
  // with the step it kept (paymentDue takes it from the wallet's state, never from the answer)
  const kept = offerTerms(offer).prepayStep;
  assert.equal(paymentDue(200000, 0, 0, kept), 1000);
  assert.equal(paymentDue(200000, 1000, 600, kept), 1600);
});

test('the expiry is judged against the explorer, the router alone only on a test chain', () => {
  assert.deepEqual(chooseTip('main', 850000, 851000), { tip: 850000, source: 'explorer' });
  assert.deepEqual(chooseTip('regtest-bcoin', 1500, 2500), { tip: 1500, source: 'explorer' });
  assert.deepEqual(chooseTip('regtest-bcoin', null, 2500), { tip: 2500, source: 'router' });
  for (const net of ['main', 'test', 'signet']) {
    assert.throws(() => chooseTip(net, null, 851000, 'mempool.space did not answer'),
      (e) => e.code === 'tip_unchecked' && e.message.includes('mempool.space did not answer'), net);
  }
  assert.throws(() => chooseTip('main', 0, 851000), (e) => e.code === 'tip_unchecked');
});

test('the refund equals the reference except for the signature, which verifies', () => {
  const c = contract();
  const r = CH.refund;
  assert.equal(refundVsize(hexToBytes(c.refundScript), hexToBytes(c.witnessScript)), r.vsize);
  const refund = signedRefund(secret, c, CH.funding, r.feerate_sat_vb);
  assert.equal(refund.fee, r.fee);
  assert.equal(bytesToHex(serializeTx(refund.tx, false)), r.unsigned_tx);
  assert.equal(refund.txid, r.txid);
  assert.equal(bytesToHex(contractSighash(refund.tx, c, 0x01)), r.digest);
  const [sig, empty, script] = refund.tx.inputs[0].witness;
  assert.equal(empty.length, 0);
  assert.equal(bytesToHex(script), c.witnessScript);
  assert.equal(sig[sig.length - 1], 0x01);
  assert.ok(verifyDigest(clientPubkey, hexToBytes(r.digest), sig.subarray(0, -1)));
  // the reference's signed refund, with its signature put into ours, is byte-identical
  const theirs = parseTx(r.python_signed_tx);
  assert.equal(bytesToHex(theirs.inputs[0].witness[0]), r.python_signature);
  refund.tx.inputs[0].witness[0] = hexToBytes(r.python_signature);
  assert.equal(bytesToHex(serializeTx(refund.tx)), r.python_signed_tx);
  assert.equal(txid(theirs), r.txid);
  const tiny = { ...c, deposit: 600 };
  assert.throws(() => signedRefund(secret, tiny, CH.funding), (e) => e.code === V.tiny_refund_code);
});

test('next amount and when to pay follow PayerChannel.next_amount', () => {
  for (const v of CH.next_amounts) {
    assert.equal(nextAmount(v.deposit, v.owed, v.step), v.amount, JSON.stringify(v));
  }
  // pay below half a step of credit, never above owed + step, never twice the same amount
  assert.equal(paymentDue(200000, 0, 0, 1000), 1000);
  assert.equal(paymentDue(200000, 1000, 0, 1000), null);
  assert.equal(paymentDue(200000, 1000, 500, 1000), null); // credit exactly half a step
  assert.equal(paymentDue(200000, 1000, 501, 1000), 1501);
  assert.equal(paymentDue(200000, 5000, 7000, 1000), 8000); // exhausted: catch up
  assert.equal(paymentDue(20000, 19000, 18800, 1000), 20000); // the change would be dust
  assert.equal(paymentDue(20000, 20000, 19990, 1000), null); // nothing left to pay
});

test('BIP21 amounts are exact decimal BTC', () => {
  for (const { sat, btc } of V.bip21_amounts) assert.equal(btcAmount(sat), btc);
  assert.equal(bip21('rb1qxyz', 200000), 'bitcoin:rb1qxyz?amount=0.00200000');
});
