// Prints what the wallet signs for the vectors' channel, for tests/test_wallet_js.py to verify
// with the Python reference (python-bitcoinlib/OpenSSL): payment messages, the refund and the
// channel's proofs (what reads its session and closes it).
import { readFileSync } from 'node:fs';

import { bytesToHex, hexToBytes } from '../../bitmesh/portal/static/btc.js';
import {
  channelProof, checkTerms, paymentMessage, proofDigest, refundScriptOf, signedRefund,
} from '../../bitmesh/portal/static/channel.js';

const V = JSON.parse(readFileSync(new URL('./vectors/channel.json', import.meta.url)));
const CH = V.channel;
const secret = hexToBytes(V.keys.client_secret);
const contract = checkTerms(CH.terms, {
  clientPubkey: hexToBytes(V.keys.client_pubkey), deposit: CH.deposit,
  refundScript: refundScriptOf(CH.refund_address, CH.network), tipHeight: CH.tip_height, network: CH.network,
});
const payments = CH.payments.map((p) => paymentMessage(secret, contract, CH.funding, p.amount));
const refund = signedRefund(secret, contract, CH.funding, CH.refund.feerate_sat_vb).hex;
const CID = '00112233445566778899aabbccddeeff';
const proofs = Object.fromEntries(['session', 'close'].map((a) => [a, {
  channel_id: CID, digest: bytesToHex(proofDigest(a, CID)), proof: channelProof(secret, a, CID),
}]));
process.stdout.write(JSON.stringify({ payments, refund, proofs }));
