// The splash page's wallet: open a channel, fund it, keep the refund, pay as the meter runs.
// Everything it needs comes from the router; its state lives in localStorage so a reload (or a
// crash) resumes the same channel. Transactions: channel.js; bytes and keys: btc.js.
import {
  bytesToHex, hexToBytes, isValidSecret, p2wpkhScript, publicKey, randomSecret, scriptToAddress, toWif,
} from './btc.js';
import {
  DEFAULT_EXPLORERS, WalletError, channelProof, checkMeter, checkTerms, chooseTip, findFunding, offerTerms, paymentDue,
  paymentMessage, refundScriptOf, signedRefund, unmeteredOwed,
} from './channel.js';
import { encodeQR } from './vendor/qr/index.js';

const STORE = 'bitmesh.wallet.v1'; // the live channel
const ARCHIVE = 'bitmesh.archive.v1'; // every key this page ever made, never deleted by "forget"
const EXPLORERS = 'bitmesh.explorer.v1'; // the user's block explorer, per network
const POLL_MS = 2000;
const EXPLORER_TIMEOUT_MS = 8000;

const $ = (id) => document.getElementById(id);
let offer = null;
let S = null; // the persisted channel state
let busy = false;
let payingStopped = '';

// --- persistence -------------------------------------------------------------------------------

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(S));
}

/** Keys and refunds go to the archive as soon as they exist: money must survive "forget". */
function archive(entry) {
  const list = load(ARCHIVE, []);
  const i = list.findIndex((e) => e.id === entry.id);
  if (i >= 0) list[i] = { ...list[i], ...entry };
  else list.push(entry);
  localStorage.setItem(ARCHIVE, JSON.stringify(list));
}

// --- HTTP --------------------------------------------------------------------------------------

// The router sells no new access now (its own upstream credit ran out: /api/offer `selling`).
const NOT_SELLING = 'This hotspot is not selling access right now. Nothing was charged; try again later.';
const NOT_SELLING_POLL_MS = 30000;

const FRIENDLY = {
  chain_unavailable: "The router cannot reach its bitcoin node right now. Try again in a minute.",
  broadcast_rejected: "The bitcoin network refused the funding transaction",
  address_invalid: "The refund address is not valid on this router's network.",
  funding_not_found: "The router's node does not know the funding transaction yet.",
  funding_double_spent: "The coins of this funding transaction were already spent elsewhere.",
  channel_expiring: "The channel is about to expire and takes no more payments. Close it and open a new one.",
  proof_invalid: "The router does not recognise this page's key for the channel.",
  proof_missing: "The router asks for this channel's key, which this page does not have.",
  price_changed: "The price changed while the channel was opening. Check the new price above and open again.",
  not_selling: NOT_SELLING,
};

class ApiError extends Error {
  constructor(code, message, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

async function api(method, path, body) {
  let resp;
  try {
    resp = await fetch(path, {
      method, cache: 'no-store',
      headers: body ? { 'Content-Type': 'application/json' } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch {
    throw new ApiError('network', 'Cannot reach the router. Are you still on its Wi-Fi?', 0);
  }
  let data = null;
  try {
    data = await resp.json();
  } catch {
    throw new ApiError('bad_answer', `The router answered HTTP ${resp.status} without JSON.`, resp.status);
  }
  if (!resp.ok) {
    const err = (data && data.error) || {};
    const code = err.code || 'error';
    const friendly = FRIENDLY[code];
    const message = friendly && code === 'broadcast_rejected' ? `${friendly}: ${err.message}` : friendly || err.message;
    throw new ApiError(code, message || `The router refused (HTTP ${resp.status}).`, resp.status);
  }
  return data;
}

/** The channel's proof for `action`: its key's signature, which only this page can make; the
 * router answers the session and closes the channel on it, whatever address we come from. */
let proofs = {};

function proof(action) {
  const key = `${S.channelId} ${action}`;
  if (!proofs[key]) proofs = { ...proofs, [key]: channelProof(hexToBytes(S.channelSecret), action, S.channelId) };
  return proofs[key];
}

const sessionPath = () => `/api/session?channel_id=${encodeURIComponent(S.channelId)}&proof=${proof('session')}`;

// --- display helpers ---------------------------------------------------------------------------

const fmt = (n) => (n == null ? '—' : Number(n).toLocaleString('en-US').replace(/,/g, '\u202f'));
const sat = (n) => `${fmt(n)} sat`;

function bytes(n) {
  if (n == null) return '—';
  if (n < 1000) return `${n} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  if (n < 1e9) return `${(n / 1e6).toFixed(2)} MB`;
  return `${(n / 1e9).toFixed(2)} GB`;
}

function duration(s) {
  if (s == null) return '—';
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h ? `${h} h ${String(m).padStart(2, '0')} min` : `${m}:${sec} min`;
}

function showError(e) {
  const box = $('error');
  if (!e) {
    box.hidden = true;
    return;
  }
  box.textContent = e instanceof ApiError || e instanceof WalletError ? e.message : `Something went wrong: ${e.message || e}`;
  box.hidden = false;
}

function setText(id, text) {
  $(id).textContent = text;
}

function show(stage) {
  for (const id of ['step-open', 'step-fund', 'step-session']) $(id).hidden = id !== stage;
}

const CHANNEL_WORDS = {
  awaiting_funding: 'waiting for funding', funding_unconfirmed: 'waiting for a confirmation', open: 'open',
  settling: 'settling on chain', settled: 'settled', failed: 'failed', closed_elsewhere: 'closed on chain',
  expired: 'expired',
};
const SESSION_WORDS = { unpaid: 'starting…', open: 'online', exhausted: 'credit used up', closed: 'closed' };

function qrSvg(text) {
  const rows = encodeQR(text, 'raw', { ecc: 'medium', border: 2 });
  let d = '';
  rows.forEach((row, y) => row.forEach((on, x) => {
    if (on) d += `M${x} ${y}h1v1h-1z`;
  }));
  const n = rows.length;
  return `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ${n} ${n}" shape-rendering="crispEdges" ` +
    `role="img" aria-label="QR code"><rect width="${n}" height="${n}" fill="#fff"/><path d="${d}" fill="#000"/></svg>`;
}

// --- the offer ---------------------------------------------------------------------------------

function renderOffer() {
  const t = offer.tariff || {};
  if (offer.portal_title) {
    setText('title', offer.portal_title);
    document.title = offer.portal_title;
  }
  setText('text', offer.portal_text || '');
  $('text').hidden = !offer.portal_text;
  const prices = [];
  if (t.sat_per_mb) prices.push([fmt(t.sat_per_mb), 'sat per MB']);
  if (t.sat_per_minute) prices.push([fmt(t.sat_per_minute), 'sat per minute']);
  $('price-main').innerHTML = '';
  prices.forEach(([n, unit], i) => {
    if (i) $('price-main').append(Object.assign(document.createElement('span'), { className: 'plus', textContent: '+' }));
    const el = document.createElement('span');
    el.className = 'amount';
    el.innerHTML = '<b></b> <small></small>';
    el.querySelector('b').textContent = n;
    el.querySelector('small').textContent = unit;
    $('price-main').append(el);
  });
  if (!prices.length) $('price-main').textContent = 'Price on request';
  setText('network', offer.network === 'main' ? 'bitcoin' : `bitcoin ${offer.network}`);
  const dep = $('deposit');
  dep.min = offer.min_deposit_sat;
  dep.max = offer.max_deposit_sat;
  if (!dep.value) dep.value = offer.min_deposit_sat;
  setText('deposit-range', `${sat(offer.min_deposit_sat)} to ${sat(offer.max_deposit_sat)}`);
  renderBuys();
  renderSelling();
}

let sellingPoll = null;

/** Not selling: said plainly, the open button off, the offer read again until it sells. */
function renderSelling() {
  const closed = offer.selling === false && !(S && S.channelId); // a channel of this page keeps its terms
  $('open-btn').disabled = closed;
  if (closed) {
    showError(new WalletError('not_selling', NOT_SELLING));
  } else if ($('error').textContent === NOT_SELLING) {
    showError(null);
  }
  if (closed && !sellingPoll) {
    sellingPoll = setTimeout(async () => {
      sellingPoll = null;
      offer = await api('GET', '/api/offer').catch(() => offer);
      renderOffer();
    }, NOT_SELLING_POLL_MS);
  }
}

function renderBuys() {
  const t = (offer && offer.tariff) || {};
  const d = Number($('deposit').value);
  const parts = [];
  if (d > 0 && t.sat_per_mb) parts.push(bytes(Math.floor((d * 1e6) / t.sat_per_mb)));
  if (d > 0 && t.sat_per_minute) parts.push(duration(Math.floor((d * 60) / t.sat_per_minute)));
  const ahead = offer && offer.prepay_step_sat ? ` This page pays at most ${sat(offer.prepay_step_sat)} ahead.` : '';
  setText('buys', parts.length ? `Up to ${parts.join(' or ')}. You pay only what you use.${ahead}` : '');
}

// --- the block height, from an explorer of the user's choice -------------------------------------

function explorerOf(net) {
  const saved = load(EXPLORERS, {})[net];
  return saved != null ? saved : DEFAULT_EXPLORERS[net] || '';
}

function keepExplorer(net, url) {
  localStorage.setItem(EXPLORERS, JSON.stringify({ ...load(EXPLORERS, {}), [net]: url }));
}

/** GET {esplora}/blocks/tip/height: the tip as a third party the router cannot answer for sees it. */
async function explorerTip(base) {
  let url;
  try {
    url = new URL(`${base.replace(/\/+$/, '')}/blocks/tip/height`);
  } catch {
    throw new Error('not a URL');
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new Error('not an http(s) URL');
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), EXPLORER_TIMEOUT_MS);
  try {
    const resp = await fetch(url, { cache: 'no-store', credentials: 'omit', signal: ctl.signal });
    if (!resp.ok) throw new Error(`${url.host} answered HTTP ${resp.status}`);
    const text = (await resp.text()).trim();
    if (!/^[0-9]{1,9}$/.test(text)) throw new Error(`${url.host} did not answer a block height`);
    return Number(text);
  } catch (e) {
    throw new Error(e.name === 'AbortError' ? `${url.host} did not answer` : e.message || `${url.host} is unreachable`);
  } finally {
    clearTimeout(timer);
  }
}

// --- step 1: open ------------------------------------------------------------------------------

function ensureRefundKey() {
  // One wallet key per page for refunds and change, shown (WIF) in the backup section.
  let keys = load(ARCHIVE, []).filter((e) => e.kind === 'refund-key' && e.network === offer.network);
  if (!keys.length) {
    const secret = randomSecret();
    const address = scriptToAddress(p2wpkhScript(publicKey(secret)), offer.network);
    archive({ id: `refund-key-${address}`, kind: 'refund-key', network: offer.network, address,
      wif: toWif(secret, offer.network), secret: bytesToHex(secret), created: Date.now() });
    keys = load(ARCHIVE, []).filter((e) => e.kind === 'refund-key' && e.network === offer.network);
  }
  return keys[0];
}

async function openChannel() {
  showError(null);
  const deposit = Number($('deposit').value);
  if (!Number.isSafeInteger(deposit) || deposit < offer.min_deposit_sat || deposit > offer.max_deposit_sat) {
    showError(new WalletError('deposit', `The deposit must be a whole number from ${sat(offer.min_deposit_sat)} to ${sat(offer.max_deposit_sat)}.`));
    return;
  }
  const refundAddress = $('refund-address').value.trim();
  const refundScript = refundScriptOf(refundAddress, offer.network);
  const fixed = offerTerms(offer); // the step and the price are the offer's for this channel's life
  const explorer = $('explorer-url').value.trim();
  keepExplorer(offer.network, explorer);
  let tipFromExplorer = null;
  let explorerError = 'none is set';
  if (explorer) {
    try {
      tipFromExplorer = await explorerTip(explorer);
    } catch (e) {
      explorerError = e.message;
    }
  }
  // Before the router is asked for anything: without a height of our own there is no channel.
  const tip = chooseTip(offer.network, tipFromExplorer, offer.tip_height, explorerError);
  const secret = randomSecret();
  const clientPubkey = publicKey(secret);
  // Saved before the router sees it: nothing is funded yet, but nothing is ever lost either.
  S = { v: 1, network: offer.network, nodeId: offer.node_id, channelSecret: bytesToHex(secret), deposit,
    refundAddress, paid: 0, state: 'opening', refunds: {}, created: Date.now(), prepayStep: fixed.prepayStep,
    tariff: fixed.tariff, metered: fixed.metered, signedMax: 0, firstPaidAt: null,
    tip: { height: tip.tip, source: tip.source, explorer: tip.source === 'explorer' ? explorer : '' } };
  save();
  let terms;
  let contract;
  try {
    // Named: if the price moved since the offer was read, the router refuses (price_changed)
    // instead of opening at a price this page did not show.
    terms = await api('POST', '/api/channels', {
      client_pubkey: bytesToHex(clientPubkey), deposit, refund_address: refundAddress, tariff: fixed.tariff,
    });
    contract = checkTerms(terms, {
      clientPubkey, deposit, refundScript, tipHeight: tip.tip, network: offer.network,
    });
  } catch (e) {
    S = null; // nothing can have been funded: start again from the form
    localStorage.removeItem(STORE);
    if (e.code === 'price_changed' || e.code === 'not_selling') {
      offer = await api('GET', '/api/offer').catch(() => offer);
      renderOffer();
    }
    throw e;
  }
  Object.assign(S, { channelId: terms.channel_id, contract, state: terms.state });
  save();
  archive({ id: terms.channel_id, kind: 'channel', network: offer.network, channelSecret: S.channelSecret,
    contract, refunds: {} });
  render();
}

// --- step 2: fund ------------------------------------------------------------------------------

function tipNote() {
  const t = S && S.tip;
  if (!t) return '';
  if (t.source === 'explorer') {
    let host = t.explorer;
    try {
      host = new URL(t.explorer).host;
    } catch { /* shown as typed */ }
    return `Expiry checked against block ${t.height} from ${host}.`;
  }
  return `Expiry checked against block ${t.height} as the router tells it: no explorer was set (a test chain).`;
}

function renderFunding() {
  const c = S.contract;
  setText('fund-amount', sat(c.deposit));
  setText('fund-address', c.fundingAddress);
  $('bip21').href = c.bip21;
  setText('bip21-text', c.bip21);
  $('qr').innerHTML = qrSvg(c.bip21);
  setText('expiry', `${c.expiry}`);
  setText('channel-id', S.channelId);
  setText('tip-note', tipNote());
  if (S.funding && !$('funding-tx').value) $('funding-tx').value = S.funding.hex;
  renderRefund();
}

function renderRefund() {
  const link = $('refund-link');
  const ok = Boolean(S.funding && S.refund);
  link.hidden = !ok;
  $('submit-funding').disabled = !ok || S.fundingSubmitted;
  if (!ok) {
    setText('funding-info', '');
    return;
  }
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([S.refund.hex + '\n'], { type: 'text/plain' }));
  link.download = `refund-${S.channelId}.txt`;
  setText('funding-info', `Funding ${S.funding.txid}:${S.funding.vout} pays the deposit. ` +
    `Your refund (valid from block ${S.contract.expiry}) is ready: save it, then submit.`);
  $('refund-hex').value = S.refund.hex;
}

function fundingPasted() {
  showError(null);
  const raw = $('funding-tx').value.trim();
  S.funding = null;
  S.refund = null;
  if (raw) {
    try {
      const funding = findFunding(raw, S.contract);
      const refund = signedRefund(hexToBytes(S.channelSecret), S.contract, funding);
      S.funding = funding;
      S.refund = { hex: refund.hex, txid: refund.txid, fee: refund.fee };
      S.refunds[funding.txid] = refund.hex; // every refund ever made for this channel is kept
      archive({ id: S.channelId, refunds: S.refunds });
    } catch (e) {
      showError(e);
    }
  }
  save(); // the refund is on disk before the funding can leave the page
  renderRefund();
}

async function submitFunding() {
  showError(null);
  if (!S.refund || !S.funding) return;
  $('submit-funding').disabled = true;
  try {
    const ch = await api('POST', `/api/channels/${S.channelId}/funding`, { tx: S.funding.hex, vout: S.funding.vout });
    S.state = ch.state;
  } catch (e) {
    // A lost answer to an earlier submission: the router may already hold this funding.
    const ch = await api('GET', `/api/channels/${S.channelId}`).catch(() => null);
    if (!ch || ch.funding !== `${S.funding.txid}:${S.funding.vout}`) {
      $('submit-funding').disabled = false;
      throw e;
    }
    S.state = ch.state;
  }
  S.fundingSubmitted = true;
  save();
  render();
  tick();
}

// --- step 3: the session -----------------------------------------------------------------------

function renderSession(s) {
  const state = S.state;
  setText('s-channel', CHANNEL_WORDS[state] || state);
  setText('s-paid', sat(S.paid));
  setText('s-deposit', sat(S.contract.deposit));
  if (s) {
    setText('s-session', SESSION_WORDS[s.state] || s.state);
    setText('s-credit', sat(s.credit));
    setText('s-bytes', bytes(s.bytes_used));
    setText('s-seconds', duration(s.seconds_used));
    const left = [];
    if (s.bytes_remaining != null) left.push(bytes(s.bytes_remaining));
    if (s.seconds_remaining != null) left.push(duration(s.seconds_remaining));
    setText('s-left', left.join(' or ') || '—');
  }
  const closed = Boolean(S.closed) || ['settling', 'settled', 'failed', 'closed_elsewhere', 'expired'].includes(state);
  $('close-btn').hidden = closed;
  $('forget-btn').hidden = !closed;
  $('session-title').textContent = closed ? 'Channel closed' : state === 'open' ? 'Connected' : 'Waiting for the funding';
  let note = payingStopped;
  if (S.settlementTxid) {
    note = `Settled in transaction ${S.settlementTxid}. What you did not use goes back to ${S.refundAddress}.`;
  } else if (state === 'expired' || (closed && !S.paid)) {
    note = `Nothing was paid. Broadcast your refund transaction after block ${S.contract.expiry} to take the deposit back.`;
  } else if (state === 'funding_unconfirmed') {
    note = 'The router waits for the funding transaction to confirm (about 10 minutes).';
  }
  setText('settlement', note);
  $('settlement').hidden = !note;
  renderConcurrentUse(s && s.concurrent_use);
}

/** The router saw two devices answer for this one's MAC and IP: a copy may be spending the credit. */
function renderConcurrentUse(use) {
  const box = $('concurrent');
  if (!use || !use.detected) {
    if (use) box.hidden = true;
    return;
  }
  const when = use.last_seen ? new Date(use.last_seen * 1000).toLocaleTimeString() : '';
  box.textContent = `Another device is using this connection: ${use.most_answers} devices answered the router ` +
    `for this device's addresses (${use.times} times, last at ${when}). Someone nearby may have copied them ` +
    'and be spending your credit. Close the channel to stop paying. An encrypted network (WPA3 "OWE", ' +
    'enhanced open) keeps others from copying your connection.';
  box.hidden = false;
}

async function tick() {
  if (busy || !S || !S.fundingSubmitted || S.closed) return;
  busy = true;
  try {
    let s = null;
    try {
      s = await api('GET', sessionPath());
    } catch {
      s = null;
    }
    const mine = s && s.channel_id === S.channelId;
    if (mine) {
      S.paid = Math.max(S.paid, s.paid);
      if (s.channel_state) S.state = s.channel_state;
    } else {
      const ch = await api('GET', `/api/channels/${S.channelId}`);
      S.paid = Math.max(S.paid, ch.paid);
      S.state = ch.state;
      if (ch.settlement_txid) S.settlementTxid = ch.settlement_txid;
    }
    save();
    let refusal = null;
    if (mine && S.state === 'open' && !payingStopped) {
      let owed = null;
      try {
        owed = meterOwed(s);
      } catch (e) {
        if (!(e instanceof WalletError)) throw e;
        refusal = e; // the router asks more than its own figures account for: no signature
      }
      const amount = owed == null ? null : paymentDue(S.contract.deposit, S.paid, owed, S.prepayStep);
      if (amount) {
        await pay(amount);
        s = await api('GET', sessionPath()).catch(() => ({ ...s, paid: S.paid, credit: S.paid - s.owed }));
      }
    }
    if (S.paid >= S.contract.deposit && !payingStopped) {
      payingStopped = 'The whole deposit is paid. Close this channel and open a new one to go on.';
    }
    showError(refusal);
    renderSession(mine ? s : null);
  } catch (e) {
    showError(e);
  } finally {
    busy = false;
  }
}

let clockBase = null; // the wall clock read once per page life, then the monotonic one

/** Seconds since this channel's first payment left the page (null: none yet). The wall clock is
 * read once per page life (it survives a reload), the monotonic clock after that: a phone
 * setting its clock back once it is online never makes the router's meter look ahead of time. */
function sinceFirstPayment() {
  const since = S.firstPaidAt || (S.paid ? S.created : null);
  if (since == null) return null;
  if (!clockBase || clockBase.channelId !== S.channelId) {
    clockBase = { channelId: S.channelId, perf: performance.now(), elapsed: Math.max(0, (Date.now() - since) / 1000) };
  }
  return clockBase.elapsed + (performance.now() - clockBase.perf) / 1000;
}

/** What may be paid for now: the router's `owed` if plausible (a WalletError if not); from a
 * router that measures nothing, the time since our first payment at the tariff fixed at open. */
function meterOwed(s) {
  const elapsed = sinceFirstPayment();
  if (!S.metered) return unmeteredOwed(S.tariff, elapsed);
  return checkMeter(s, { tariff: S.tariff, signedMax: Math.max(S.paid, S.signedMax || 0), elapsedSeconds: elapsed });
}

async function pay(amount) {
  const msg = paymentMessage(hexToBytes(S.channelSecret), S.contract, S.funding, amount);
  // On disk before it leaves: the meter's clock starts with the first payment, and the router
  // may hold any amount signed.
  if (!S.firstPaidAt) S.firstPaidAt = Date.now();
  S.signedMax = Math.max(S.signedMax || 0, amount);
  save();
  try {
    const ack = await api('POST', `/api/channels/${S.channelId}/payments`, msg);
    S.paid = Math.max(S.paid, ack.paid);
  } catch (e) {
    if (e.code === 'payment_not_increasing') {
      const ch = await api('GET', `/api/channels/${S.channelId}`);
      S.paid = Math.max(S.paid, ch.paid);
    } else if (['channel_not_open', 'channel_expiring', 'payment_exceeds_deposit', 'channel_unknown'].includes(e.code)) {
      payingStopped = e.message;
    } else {
      throw e;
    }
  } finally {
    save();
  }
}

async function closeChannel() {
  showError(null);
  $('close-btn').disabled = true;
  try {
    const ch = await api('POST', `/api/channels/${S.channelId}/close`, { proof: proof('close') });
    Object.assign(S, { state: ch.state, paid: Math.max(S.paid, ch.paid), settlementTxid: ch.settlement_txid, closed: true });
    save();
    archive({ id: S.channelId, settlementTxid: ch.settlement_txid });
    renderSession(null);
  } finally {
    $('close-btn').disabled = false;
  }
}

function forget() {
  if (!S || !(S.closed || !S.fundingSubmitted)) return;
  archive({ id: S.channelId || `unopened-${S.created}`, kind: 'channel', state: S.state, forgotten: Date.now() });
  localStorage.removeItem(STORE);
  S = null;
  payingStopped = '';
  $('funding-tx').value = '';
  render();
}

// --- wiring ------------------------------------------------------------------------------------

function renderBackup() {
  const key = offer && ensureRefundKey();
  setText('backup-address', key ? key.address : '');
  setText('backup-wif', key ? key.wif : '');
  $('refund-hex-row').hidden = !(S && S.refund);
}

function render() {
  renderBackup();
  if (!S || !S.channelId) {
    show('step-open');
    return;
  }
  if (!S.fundingSubmitted) {
    show('step-fund');
    renderFunding();
    return;
  }
  show('step-session');
  renderSession(null);
}

function guarded(fn) {
  return async (ev) => {
    if (ev) ev.preventDefault();
    try {
      await fn();
    } catch (e) {
      showError(e);
    }
  };
}

function copy(text) {
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).catch(() => {});
    return;
  }
  const area = Object.assign(document.createElement('textarea'), { value: text });
  document.body.append(area);
  area.select();
  document.execCommand('copy');
  area.remove();
}

async function start() {
  $('open-form').addEventListener('submit', guarded(openChannel));
  $('deposit').addEventListener('input', renderBuys);
  $('funding-tx').addEventListener('input', fundingPasted);
  $('submit-funding').addEventListener('click', guarded(submitFunding));
  $('close-btn').addEventListener('click', guarded(closeChannel));
  $('forget-btn').addEventListener('click', guarded(forget));
  $('cancel-btn').addEventListener('click', guarded(async () => {
    if (confirm('Cancel this channel? Only do this if you have NOT sent any bitcoin to its address.')) forget();
  }));
  $('copy-address').addEventListener('click', () => copy(S.contract.fundingAddress));
  $('copy-uri').addEventListener('click', () => copy(S.contract.bip21));

  S = load(STORE, null);
  if (S && !(S.channelSecret && isValidSecret(hexToBytes(S.channelSecret)))) S = null;
  try {
    offer = await api('GET', '/api/offer');
  } catch (e) {
    showError(e);
    setTimeout(start, 5000);
    return;
  }
  renderOffer();
  $('refund-address').value = ensureRefundKey().address;
  $('explorer-url').value = explorerOf(offer.network);
  if (S && S.channelId && S.prepayStep == null) {
    // A channel opened by an older page: its terms are fixed from now on.
    const fixed = offerTerms(offer);
    Object.assign(S, { prepayStep: fixed.prepayStep, tariff: fixed.tariff, metered: fixed.metered });
    save();
  }
  if (S && S.channelId && !S.closed) {
    const ch = await api('GET', `/api/channels/${S.channelId}`).catch(() => null);
    if (ch) {
      S.state = ch.state;
      S.paid = Math.max(S.paid, ch.paid);
      if (ch.funding && S.funding && ch.funding === `${S.funding.txid}:${S.funding.vout}`) S.fundingSubmitted = true;
      save();
    }
  } else if (S && !S.channelId) {
    S = null; // opening never completed: nothing was funded
    localStorage.removeItem(STORE);
  }
  render();
  document.body.classList.add('ready');
  setInterval(tick, POLL_MS);
  tick();
}

start();
