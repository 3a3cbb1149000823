'use strict';
'require view';
'require dom';
'require poll';
'require rpc';
'require uci';
'require ui';

// Status: the running service through its ubus object `luci.bitmesh` (bitmesh/ubus_object.py:
// the methods of `bitmesh`, whose signatures also take the `ubus_rpc_session` uhttpd adds to
// every call from LuCI). The rpcd ACL (acl.d/luci-app-bitmesh.json) grants exactly the methods
// declared here: the four readers under "read", kick and close_channel under "write".
//
// The service not running is the normal state of a fresh install (disabled until a payout
// address is set): the page says so, keeps polling and shows the service once it answers.

var OBJECT = 'luci.bitmesh';
var POLL_SECONDS = 5;

// A reply is the answer, or {"error": {"code", "message"}} when the service refuses. A call that
// does not reach the service (its object is not on ubus, access denied, a bare ubus status) is
// turned into the same shape by `answered()` below.
var NO_ANSWER = {
	error: { code: 'no_answer', message: _('The BitMesh service does not answer') }
};
var NOT_RUNNING = {
	error: { code: 'not_running', message: _('The BitMesh service is not running') }
};

function declare(method, params) {
	return rpc.declare({ object: OBJECT, method: method, params: params || [] });
}

var callStatus = declare('status'),
    callClients = declare('clients'),
    callChannels = declare('channels'),
    callEarnings = declare('earnings'),
    callKick = declare('kick', [ 'mac' ]),
    callCloseChannel = declare('close_channel', [ 'channel_id' ]);

// The reply of a call, or the error shape when the call failed on its way. uhttpd answers a
// call to an object ubusd does not have with JSON-RPC error -32000 "Object not found" (rpc.js
// rejects with an RPCError), LuCI's own ubus proxy (admin/ubus) with ubus status 4: either way
// the service is not running.
function answered(promise) {
	return Promise.resolve(promise).then(function(res) {
		if (res === 4)
			return NOT_RUNNING;
		if (typeof(res) == 'number' && res !== 0)
			return { error: { code: 'ubus_' + res, message: rpc.getStatusText(res) } };
		return L.isObject(res) ? res : NO_ANSWER;
	}, function(err) {
		var text = String(err && err.message || err);

		if (/error -32000:|Object not found/.test(text))
			return NOT_RUNNING;
		if (/error -32002:|Access denied/.test(text))
			return { error: { code: 'access_denied', message: _('Access denied: this login may not read the BitMesh status') } };
		return { error: { code: 'no_answer', message: text } };
	});
}

// bitmesh.main.enabled as saved, read afresh (it says why the service is not running)
function savedEnabled() {
	uci.unload('bitmesh');
	return L.resolveDefault(uci.load('bitmesh'), null).then(function() {
		return uci.get('bitmesh', 'main', 'enabled') == '1';
	});
}

// The error of a reply, or null when it is an answer.
function errorOf(reply) {
	if (!L.isObject(reply))
		return NO_ANSWER.error;
	return L.isObject(reply.error) ? reply.error : null;
}

function errorText(err) {
	return _('BitMesh: %s (%s)').format(err.message || _('unknown error'), err.code || '?');
}

function notifyError(err) {
	ui.addNotification(null, E('p', errorText(err)), 'danger');
}

// Amounts in %s: LuCI's %d is 32-bit.
function sats(n) {
	return (n == null) ? '-' : _('%s sat').format(n);
}

function bytes(n) {
	return (n == null) ? '-' : '%1024.2mB'.format(n);
}

function duration(seconds) {
	if (seconds == null)
		return '-';
	var h = Math.floor(seconds / 3600), m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
	return h ? '%dh %02dm'.format(h, m) : '%dm %02ds'.format(m, s);
}

function shortId(id) {
	return id ? E('span', { 'title': id }, id.length > 12 ? id.substr(0, 12) + '…' : id) : '-';
}

function when(unix) {
	return unix ? new Date(unix * 1000).toLocaleString() : '-';
}

function table(headers, rows, empty) {
	var trs = [
		E('tr', { 'class': 'tr table-titles' }, headers.map(function(h) {
			return E('th', { 'class': 'th' }, h);
		}))
	];

	if (!rows.length)
		trs.push(E('tr', { 'class': 'tr placeholder' }, [
			E('td', { 'class': 'td', 'colspan': headers.length }, E('em', empty))
		]));

	rows.forEach(function(cells) {
		trs.push(E('tr', { 'class': 'tr' }, cells.map(function(c) {
			return E('td', { 'class': 'td' }, c);
		})));
	});

	return E('table', { 'class': 'table' }, trs);
}

function keyValueTable(rows) {
	return E('table', { 'class': 'table' }, rows.map(function(r) {
		return E('tr', { 'class': 'tr' }, [
			E('td', { 'class': 'td left', 'width': '33%' }, r[0]),
			E('td', { 'class': 'td left' }, r[1])
		]);
	}));
}

function failedSection(err) {
	return E('p', {}, E('em', errorText(err)));
}

return view.extend({
	// errors already notified, so that polling does not repeat one every 5 s while it lasts
	shownErrors: {},

	load: function() {
		return Promise.all([
			answered(callStatus()), answered(callClients()), answered(callChannels()), answered(callEarnings()), savedEnabled()
		]);
	},

	// Kick and Close only for a login that may call them: LuCI tells a view whether its menu
	// node's ACL groups are granted read-only (L.env.nodespec.readonly).
	mayAct: function() {
		return L.hasViewPermission() === true;
	},

	notifyNewErrors: function(replies) {
		var shown = {};

		replies.forEach(L.bind(function(reply) {
			var err = errorOf(reply), key;
			if (!err || err.code == 'not_running')
				return;
			key = errorText(err);
			if (!this.shownErrors[key] && !shown[key])
				notifyError(err);
			shown[key] = true;
		}, this));

		this.shownErrors = shown;
	},

	handleKick: function(mac, ev) {
		if (!confirm(_('Cut off %s now? Its channel is settled for what it used; the rest goes back to the client.').format(mac)))
			return;

		return answered(callKick(mac)).then(function(reply) {
			var err = errorOf(reply);
			if (err)
				notifyError(err);
			else
				ui.addNotification(null, E('p', _('%s cut off; channels settled: %s').format(
					mac, L.toArray(reply.kicked).join(', ') || '-')), 'info');
		}).then(L.bind(this.refresh, this));
	},

	handleClose: function(channelId, ev) {
		if (!confirm(_('Settle channel %s now? Its client loses access.').format(channelId)))
			return;

		return answered(callCloseChannel(channelId)).then(function(reply) {
			var err = errorOf(reply);
			if (err)
				notifyError(err);
			else
				ui.addNotification(null, E('p', _('Channel %s: %s, settlement transaction %s').format(
					reply.channel_id, reply.state, reply.settlement_txid || '-')), 'info');
		}).then(L.bind(this.refresh, this));
	},

	renderNotRunning: function(enabled) {
		return E('div', { 'class': 'cbi-section', 'id': 'bitmesh-not-running' }, [
			E('h3', _('Service not running')),
			E('div', { 'class': 'alert-message notice' }, [
				E('p', enabled
					? _('BitMesh is enabled but not running. It starts a few seconds after Save & Apply; if it does not, the system log (logread) names the option it refuses.')
					: _('BitMesh is not running: the hotspot is disabled. Set a payout address and tick Enable in Settings, then Save & Apply.')),
				E('p', _('This page checks again every %d seconds.').format(POLL_SECONDS))
			])
		]);
	},

	renderStatus: function(st) {
		var err = errorOf(st), chain;
		if (err)
			return failedSection(err);

		chain = L.isObject(st.chain) ? st.chain : {};

		return keyValueTable([
			[ _('Service'), st.enabled ? _('running') : _('running, disabled (enable it in Settings)') ],
			[ _('Version'), st.version || '-' ],
			[ _('Bitcoin network'), st.network || '-' ],
			[ _('Gated network'), '%s%s (%s)'.format(st.interface || '-', st.device ? ' / ' + st.device : '',
				st.firewall ? _('firewall active') : _('firewall not active')) ],
			[ _('Portal'), st.portal_url ? E('a', { 'href': st.portal_url, 'target': '_blank' }, st.portal_url) : '-' ],
			[ _('Chain backend'), '%s, %s: %s'.format(chain.backend || '-', chain.url || '-',
				chain.ok ? ((chain.tip_height != null) ? _('block %s').format(chain.tip_height) : _('reachable'))
					: (chain.error ? _('unreachable (%s)').format(chain.error) : _('not checked yet'))) ],
			[ _('Prices'), _('%s per MB, %s per minute, prepay step %s').format(
				sats(st.price_sat_per_mb), sats(st.price_sat_per_minute), sats(st.prepay_step_sat)) +
				(st.demand_pricing ? ' ' + _('(demand pricing: new channels; base price %s per MB, %s per minute)').format(
					sats(st.base_price_sat_per_mb), sats(st.base_price_sat_per_minute)) : '') ],
			[ _('Clients online'), '%s'.format(st.clients_online) ],
			[ _('Open channels'), '%s'.format(st.channels_open) ],
			[ _('Payout address'), st.payout_address || '-' ]
		]);
	},

	// Uplink mode (resale): the wallet to fund, what the uplink costs and whether this hotspot sells.
	renderUplink: function(up) {
		var w = L.isObject(up.wallet) ? up.wallet : null, ch = L.isObject(up.channel) ? up.channel : null,
		    buy = L.isObject(up.upstream_price) ? up.upstream_price : null,
		    sell = L.isObject(up.resale_price) ? up.resale_price : null;

		return keyValueTable([
			[ _('Selling'), up.selling ? _('yes') : (up.cut ? _('no: clients cut (%s)') : _('no (%s)')).format(up.reason || up.error || '-') ],
			[ _('Upstream portal'), up.portal || '-' ],
			[ _('Deposit address (fund it)'), E('code', {}, up.deposit_address || '-') ],
			[ _('Wallet'), w ? _('%s (%s unconfirmed)').format(sats(w.total_sat), sats(w.unconfirmed_sat)) : _('not read yet') ],
			[ _('Budget'), _('%s spent of %s, %s left').format(sats(up.spent_sat), sats(up.budget_sat), sats(up.budget_left_sat)) ],
			[ _('Uplink channel'), ch ? _('%s: paid %s of %s, credit %s').format(shortId(ch.channel_id), sats(ch.paid),
				sats(ch.deposit), sats(ch.credit)) : '-' ],
			[ _('Upstream price'), buy ? _('%s per MB, %s per minute').format(sats(buy.sat_per_mb), sats(buy.sat_per_minute)) : '-' ],
			[ _('Resale price'), sell ? _('%s per MB, %s per minute (margin %s%%)').format(sats(sell.sat_per_mb),
				sats(sell.sat_per_minute), up.margin_percent) : '-' ]
		]);
	},

	renderEarnings: function(earnings) {
		var err = errorOf(earnings);
		if (err)
			return failedSection(err);

		return E('div', {}, [
			keyValueTable([
				[ _('Settled (confirmed)'), _('%s in %s channels').format(sats(earnings.settled_sat), earnings.settled_channels) ],
				[ _('Settling (unconfirmed)'), _('%s in %s channels').format(sats(earnings.settling_sat), earnings.settling_channels) ],
				[ _('Open channels'), _('%s owed of %s paid in %s channels').format(
					sats(earnings.open_owed_sat), sats(earnings.open_paid_sat), earnings.open_channels) ]
			]),
			E('h4', _('Recent settlements')),
			table(
				[ _('Channel'), _('Transaction'), _('Payout'), _('State'), _('Updated') ],
				L.toArray(earnings.recent).map(function(r) {
					return [ shortId(r.channel_id), shortId(r.txid), sats(r.payout_sat), r.state, when(r.updated_at) ];
				}),
				_('No settlements yet.'))
		]);
	},

	renderClients: function(reply) {
		var err = errorOf(reply), act = this.mayAct();
		if (err)
			return failedSection(err);

		return table(
			[ _('MAC'), _('IP'), _('Data used'), _('Time used'), _('Credit'), _('Paid'), _('State') ].concat(act ? [ '' ] : []),
			L.toArray(reply.clients).map(L.bind(function(c) {
				return [
					c.mac, c.ip || '-', bytes(c.bytes_used), duration(c.seconds_used), sats(c.credit), sats(c.paid), c.state
				].concat(act ? [ E('button', {
					'class': 'cbi-button cbi-button-remove',
					'click': ui.createHandlerFn(this, 'handleKick', c.mac)
				}, _('Kick')) ] : []);
			}, this)),
			_('No paying clients right now.'));
	},

	renderChannels: function(reply) {
		var err = errorOf(reply), act = this.mayAct();
		if (err)
			return failedSection(err);

		return table(
			[ _('Channel'), _('Client'), _('State'), _('Deposit'), _('Paid'), _('Owed'), _('Settlement') ].concat(act ? [ '' ] : []),
			L.toArray(reply.channels).map(L.bind(function(ch) {
				return [
					shortId(ch.channel_id), ch.client_mac || '-', ch.state, sats(ch.deposit), sats(ch.paid), sats(ch.owed),
					shortId(ch.settlement_txid)
				].concat(act ? [ (ch.state == 'open') ? E('button', {
					'class': 'cbi-button cbi-button-action',
					'click': ui.createHandlerFn(this, 'handleClose', ch.channel_id)
				}, _('Close')) : '' ] : []);
			}, this)),
			_('No channels yet.'));
	},

	renderSections: function(data) {
		var st = data[0], err = errorOf(st);

		this.notifyNewErrors(data.slice(0, 4));

		if (err && err.code == 'not_running')
			return [ this.renderNotRunning(data[4]) ];

		return [
			E('div', { 'class': 'cbi-section' }, [ E('h3', _('Hotspot')), this.renderStatus(st) ]),
			L.isObject(st.uplink) ? E('div', { 'class': 'cbi-section' }, [ E('h3', _('Uplink (resale)')), this.renderUplink(st.uplink) ]) : '',
			E('div', { 'class': 'cbi-section' }, [ E('h3', _('Earnings')), this.renderEarnings(data[3]) ]),
			E('div', { 'class': 'cbi-section' }, [ E('h3', _('Clients')), this.renderClients(data[1]) ]),
			E('div', { 'class': 'cbi-section' }, [ E('h3', _('Channels')), this.renderChannels(data[2]) ])
		];
	},

	refresh: function() {
		return this.load().then(L.bind(function(data) {
			var container = document.getElementById('bitmesh-status');
			if (container)
				dom.content(container, this.renderSections(data));
		}, this));
	},

	render: function(data) {
		poll.add(L.bind(this.refresh, this), POLL_SECONDS);

		return E('div', { 'class': 'cbi-map' }, [
			E('h2', _('BitMesh status')),
			E('div', { 'class': 'cbi-map-descr' }, this.mayAct()
				? _('Paying clients, their channels and your earnings; refreshed every %d seconds.').format(POLL_SECONDS)
				: _('Paying clients, their channels and your earnings; refreshed every %d seconds. This login may only look.').format(POLL_SECONDS)),
			E('div', { 'id': 'bitmesh-status' }, this.renderSections(data))
		]);
	},

	// a read-only view: no Save / Save & Apply / Reset buttons
	handleSaveApply: null,
	handleSave: null,
	handleReset: null
});
