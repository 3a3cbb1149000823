'use strict';
'require view';
'require dom';
'require poll';
'require rpc';
'require ui';

// Status: the running service through its ubus object `bitmesh` (bitmesh/control.py). The
// rpcd ACL (acl.d/luci-app-bitmesh.json) grants exactly the methods declared here: the four
// readers under "read", kick and close_channel under "write".

var POLL_SECONDS = 5;

// A reply is the answer, or {"error": {"code", "message"}} when the service refuses. When the
// object is missing (service stopped) or access is denied, rpcd answers a bare ubus status
// code instead; `expect` turns anything that is not an object into this same error shape.
var NO_ANSWER = {
	error: { code: 'no_answer', message: _('The BitMesh service does not answer; is it running?') }
};

var callStatus = rpc.declare({
	object: 'bitmesh',
	method: 'status',
	expect: { '': NO_ANSWER }
});

var callClients = rpc.declare({
	object: 'bitmesh',
	method: 'clients',
	expect: { '': NO_ANSWER }
});

var callChannels = rpc.declare({
	object: 'bitmesh',
	method: 'channels',
	expect: { '': NO_ANSWER }
});

var callEarnings = rpc.declare({
	object: 'bitmesh',
	method: 'earnings',
	expect: { '': NO_ANSWER }
});

var callKick = rpc.declare({
	object: 'bitmesh',
	method: 'kick',
	params: [ 'mac' ],
	expect: { '': NO_ANSWER }
});

var callCloseChannel = rpc.declare({
	object: 'bitmesh',
	method: 'close_channel',
	params: [ 'channel_id' ],
	expect: { '': NO_ANSWER }
});

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
		return Promise.all([ callStatus(), callClients(), callChannels(), callEarnings() ]);
	},

	notifyNewErrors: function(replies) {
		var shown = {};

		replies.forEach(L.bind(function(reply) {
			var err = errorOf(reply), key;
			if (!err)
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

		return callKick(mac).then(function(reply) {
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

		return callCloseChannel(channelId).then(function(reply) {
			var err = errorOf(reply);
			if (err)
				notifyError(err);
			else
				ui.addNotification(null, E('p', _('Channel %s: %s, settlement transaction %s').format(
					reply.channel_id, reply.state, reply.settlement_txid || '-')), 'info');
		}).then(L.bind(this.refresh, this));
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
					: _('unreachable')) ],
			[ _('Prices'), _('%s per MB, %s per minute, prepay step %s').format(
				sats(st.price_sat_per_mb), sats(st.price_sat_per_minute), sats(st.prepay_step_sat)) ],
			[ _('Clients online'), '%s'.format(st.clients_online) ],
			[ _('Open channels'), '%s'.format(st.channels_open) ],
			[ _('Payout address'), st.payout_address || '-' ]
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
		var err = errorOf(reply);
		if (err)
			return failedSection(err);

		return table(
			[ _('MAC'), _('IP'), _('Data used'), _('Time used'), _('Credit'), _('Paid'), _('State'), '' ],
			L.toArray(reply.clients).map(L.bind(function(c) {
				return [
					c.mac, c.ip || '-', bytes(c.bytes_used), duration(c.seconds_used), sats(c.credit), sats(c.paid), c.state,
					E('button', {
						'class': 'cbi-button cbi-button-remove',
						'click': ui.createHandlerFn(this, 'handleKick', c.mac)
					}, _('Kick'))
				];
			}, this)),
			_('No paying clients right now.'));
	},

	renderChannels: function(reply) {
		var err = errorOf(reply);
		if (err)
			return failedSection(err);

		return table(
			[ _('Channel'), _('Client'), _('State'), _('Deposit'), _('Paid'), _('Owed'), _('Settlement'), '' ],
			L.toArray(reply.channels).map(L.bind(function(ch) {
				return [
					shortId(ch.channel_id), ch.client_mac || '-', ch.state, sats(ch.deposit), sats(ch.paid), sats(ch.owed),
					shortId(ch.settlement_txid),
					(ch.state == 'open') ? E('button', {
						'class': 'cbi-button cbi-button-action',
						'click': ui.createHandlerFn(this, 'handleClose', ch.channel_id)
					}, _('Close')) : ''
				];
			}, this)),
			_('No channels yet.'));
	},

	renderSections: function(data) {
		this.notifyNewErrors(data);

		return [
			E('div', { 'class': 'cbi-section' }, [ E('h3', _('Hotspot')), this.renderStatus(data[0]) ]),
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
			E('div', { 'class': 'cbi-map-descr' },
				_('Paying clients, their channels and your earnings; refreshed every %d seconds.').format(POLL_SECONDS)),
			E('div', { 'id': 'bitmesh-status' }, this.renderSections(data))
		]);
	},

	// a read-only view: no Save / Save & Apply / Reset buttons
	handleSaveApply: null,
	handleSave: null,
	handleReset: null
});
