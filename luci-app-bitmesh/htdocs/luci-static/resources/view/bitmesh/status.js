'use strict';
'require view';
'require rpc';
'require poll';
'require ui';

// Status: the running service through its ubus object `bitmesh` (bitmesh/control.py). rpcd's
// ACL (acl.d/luci-app-bitmesh.json) grants exactly the methods declared here.

var callStatus = rpc.declare({ object: 'bitmesh', method: 'status' });
var callClients = rpc.declare({ object: 'bitmesh', method: 'clients' });
var callChannels = rpc.declare({ object: 'bitmesh', method: 'channels' });
var callEarnings = rpc.declare({ object: 'bitmesh', method: 'earnings' });
var callKick = rpc.declare({ object: 'bitmesh', method: 'kick', params: [ 'mac' ] });
var callCloseChannel = rpc.declare({ object: 'bitmesh', method: 'close_channel', params: [ 'channel_id' ] });

var POLL_SECONDS = 5;

function sats(n) {
	return (n == null) ? '-' : '%d sat'.format(n);
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
	return id ? id.substr(0, 12) + '…' : '-';
}

// A reply is either the answer or {"error": {"code", "message"}} (the service refused).
function failed(reply) {
	if (reply && reply.error) {
		ui.addNotification(null, E('p', _('BitMesh: %s (%s)').format(reply.error.message, reply.error.code)), 'danger');
		return true;
	}
	return false;
}

function table(headers, rows, empty) {
	var t = E('table', { 'class': 'table' }, [
		E('tr', { 'class': 'tr table-titles' }, headers.map(function(h) { return E('th', { 'class': 'th' }, h); }))
	]);
	if (!rows.length)
		t.appendChild(E('tr', { 'class': 'tr placeholder' }, [ E('td', { 'class': 'td' }, empty) ]));
	rows.forEach(function(cells) {
		t.appendChild(E('tr', { 'class': 'tr' }, cells.map(function(c) { return E('td', { 'class': 'td' }, c); })));
	});
	return t;
}

return view.extend({
	load: function() {
		return Promise.all([ callStatus(), callClients(), callChannels(), callEarnings() ]);
	},

	handleKick: function(mac, ev) {
		if (!confirm(_('Cut off %s now? Its channel is settled for what it used; the rest goes back to it.').format(mac)))
			return;
		return callKick(mac).then(function(reply) {
			if (!failed(reply))
				ui.addNotification(null, E('p', _('%s cut off; channels settled: %s').format(mac, reply.kicked.join(', ') || '-')), 'info');
		}).then(L.bind(this.refresh, this));
	},

	handleClose: function(channelId, ev) {
		if (!confirm(_('Settle channel %s now? The client loses access.').format(channelId)))
			return;
		return callCloseChannel(channelId).then(function(reply) {
			if (!failed(reply))
				ui.addNotification(null, E('p', _('Channel %s: %s, settlement %s').format(
					shortId(reply.channel_id), reply.state, reply.settlement_txid || '-')), 'info');
		}).then(L.bind(this.refresh, this));
	},

	renderStatus: function(st, earnings) {
		if (failed(st) || failed(earnings))
			return E('div');
		var rows = [
			[ _('Portal'), st.portal_url || '-' ],
			[ _('Gated network'), '%s (%s)'.format(st.interface || '-', st.firewall ? _('firewall on') : _('firewall off')) ],
			[ _('Bitcoin network'), st.network ],
			[ _('Chain backend'), '%s %s, %s'.format(st.chain.backend, st.chain.url,
				st.chain.ok ? _('tip %d').format(st.chain.tip_height) : _('unreachable')) ],
			[ _('Prices'), _('%d sat per MB, %d sat per minute, prepay step %d sat').format(
				st.price_sat_per_mb, st.price_sat_per_minute, st.prepay_step_sat) ],
			[ _('Clients online'), '%d (%d open channels)'.format(st.clients_online, st.channels_open) ],
			[ _('Earned (confirmed)'), _('%s in %d channels').format(sats(earnings.settled_sat), earnings.settled_channels) ],
			[ _('Settling'), _('%s in %d channels').format(sats(earnings.settling_sat), earnings.settling_channels) ],
			[ _('Open channels'), _('%s used of %s paid').format(sats(earnings.open_owed_sat), sats(earnings.open_paid_sat)) ],
			[ _('Payout address'), st.payout_address ],
			[ _('Version'), st.version ]
		];
		return E('table', { 'class': 'table' }, rows.map(function(r) {
			return E('tr', { 'class': 'tr' }, [
				E('td', { 'class': 'td left', 'width': '33%' }, r[0]), E('td', { 'class': 'td left' }, r[1])
			]);
		}));
	},

	renderClients: function(reply) {
		if (failed(reply))
			return E('div');
		return table(
			[ _('MAC'), _('IP'), _('Used'), _('Time'), _('Paid'), _('Credit'), _('State'), '' ],
			reply.clients.map(L.bind(function(c) {
				return [ c.mac, c.ip, bytes(c.bytes_used), duration(c.seconds_used), sats(c.paid), sats(c.credit), c.state,
					E('button', { 'class': 'btn cbi-button-remove', 'click': ui.createHandlerFn(this, 'handleKick', c.mac) }, _('Kick')) ];
			}, this)),
			_('No paying clients right now.'));
	},

	renderChannels: function(reply) {
		if (failed(reply))
			return E('div');
		return table(
			[ _('Channel'), _('Client'), _('State'), _('Deposit'), _('Paid'), _('Used'), _('Settlement'), '' ],
			reply.channels.map(L.bind(function(ch) {
				return [ shortId(ch.channel_id), ch.client_mac || '-', ch.state, sats(ch.deposit), sats(ch.paid), sats(ch.owed),
					ch.settlement_txid ? shortId(ch.settlement_txid) : '-',
					ch.state == 'open'
						? E('button', { 'class': 'btn cbi-button-action', 'click': ui.createHandlerFn(this, 'handleClose', ch.channel_id) }, _('Close'))
						: '' ];
			}, this)),
			_('No channels yet.'));
	},

	refresh: function() {
		return this.load().then(L.bind(function(data) {
			var root = document.getElementById('bitmesh-status');
			if (root)
				root.replaceWith(this.renderAll(data));
		}, this));
	},

	renderAll: function(data) {
		return E('div', { 'id': 'bitmesh-status' }, [
			E('div', { 'class': 'cbi-section' }, [ E('h3', _('Hotspot')), this.renderStatus(data[0], data[3]) ]),
			E('div', { 'class': 'cbi-section' }, [ E('h3', _('Clients')), this.renderClients(data[1]) ]),
			E('div', { 'class': 'cbi-section' }, [ E('h3', _('Channels')), this.renderChannels(data[2]) ])
		]);
	},

	render: function(data) {
		poll.add(L.bind(this.refresh, this), POLL_SECONDS);
		return E('div', { 'class': 'cbi-map' }, [
			E('h2', _('BitMesh status')),
			this.renderAll(data)
		]);
	},

	handleSaveApply: null,
	handleSave: null,
	handleReset: null
});
