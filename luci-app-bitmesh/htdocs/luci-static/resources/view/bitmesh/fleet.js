'use strict';
'require view';
'require dom';
'require poll';
'require rpc';

// Fleet: the owner's routers in one place, from what they publish over MQTT (bitmesh/market/
// fleet.py), through this router's `luci.bitmesh` `fleet` method (a read method of the rpcd ACL).
// Totals count only when signed by the node's key: a forged or unsigned one is shown as not
// verified and never summed. With MQTT off the service answers `mqtt_disabled`.

var OBJECT = 'luci.bitmesh';
var POLL_SECONDS = 10;

function declare(method, params) {
	return rpc.declare({ object: OBJECT, method: method, params: params || [] });
}

var callFleet = declare('fleet');

function answered(promise) {
	return Promise.resolve(promise).then(function(res) {
		if (res === 4)
			return { error: { code: 'not_running', message: _('The BitMesh service is not running') } };
		if (typeof(res) == 'number' && res !== 0)
			return { error: { code: 'ubus_' + res, message: rpc.getStatusText(res) } };
		return L.isObject(res) ? res : { error: { code: 'no_answer', message: _('The BitMesh service does not answer') } };
	}, function(err) {
		var text = String(err && err.message || err);
		if (/error -32000:|Object not found/.test(text))
			return { error: { code: 'not_running', message: _('The BitMesh service is not running') } };
		return { error: { code: 'no_answer', message: text } };
	});
}

// Amounts in %s: LuCI's %d is 32-bit.
function sats(n) {
	return (n == null) ? '-' : _('%s sat').format(n);
}

function whenMs(ms) {
	return ms ? new Date(ms).toLocaleString() : '-';
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

	return E('table', { 'class': 'table', 'id': 'bitmesh-fleet-nodes' }, trs);
}

function status(n) {
	var text = { online: _('online'), offline: _('offline'), unverified: _('online, offer not verified'), unknown: _('unknown') }[n.status] || n.status;
	return n.since ? _('%s since %s').format(text, whenMs(n.since)) : text;
}

return view.extend({
	load: function() {
		return answered(callFleet());
	},

	renderFleet: function(reply) {
		var err = L.isObject(reply.error) ? reply.error : null, f;
		if (err)
			return E('div', { 'class': 'alert-message notice', 'id': 'bitmesh-fleet-error' }, err.code == 'mqtt_disabled'
				? _('The fleet view reads what your routers publish over MQTT: enable the marketplace in Settings.')
				: _('BitMesh: %s (%s)').format(err.message || _('unknown error'), err.code || '?'));

		f = L.isObject(reply.fleet) ? reply.fleet : {};
		return E('div', {}, [
			E('p', { 'id': 'bitmesh-fleet-totals' }, _('%s nodes, %s online; earned %s (settled %s, settling %s), open %s; clients now %s, in total %s; %s payments').format(
				f.nodes, f.online, sats(f.earned_sat), sats(f.settled_sat), sats(f.settling_sat), sats(f.open_paid_sat),
				f.clients_now, f.clients_total, f.payments)),
			table(
				[ _('Node'), _('State'), _('Price'), _('Clients now'), _('Clients total'), _('Earned'), _('Payments'), _('Totals') ],
				L.toArray(reply.nodes).map(function(n) {
					return [
						E('code', {}, n.node_id), status(n),
						n.offer_verified ? _('%s per MB, %s per minute').format(sats(n.sat_per_mb), sats(n.sat_per_minute))
							: (n.offer_refused ? _('not verified (%s)').format(n.offer_refused) : '-'),
						(n.clients_now == null) ? '-' : '%s'.format(n.clients_now),
						(n.clients_total == null) ? '-' : '%s'.format(n.clients_total),
						sats(n.earned_sat),
						(n.payments == null) ? '-' : '%s'.format(n.payments),
						n.totals_verified ? _('signed, %s').format(whenMs(n.totals_at))
							: (n.totals_refused ? _('not verified (%s): not counted').format(n.totals_refused) : '-')
					];
				}),
				_('No node has published yet.')),
			(reply.refused && Object.keys(reply.refused).length) ? E('p', {}, E('em', _('Refused records: %s').format(
				Object.keys(reply.refused).map(function(k) { return k + ' ' + reply.refused[k]; }).join(', ')))) : ''
		]);
	},

	refresh: function() {
		return this.load().then(L.bind(function(reply) {
			var container = document.getElementById('bitmesh-fleet');
			if (container)
				dom.content(container, this.renderFleet(reply));
		}, this));
	},

	render: function(reply) {
		poll.add(L.bind(this.refresh, this), POLL_SECONDS);

		return E('div', { 'class': 'cbi-map' }, [
			E('h2', _('BitMesh fleet')),
			E('div', { 'class': 'cbi-map-descr' }, _('Your routers as they publish over MQTT: state, prices, clients and earnings; refreshed every %d seconds.').format(POLL_SECONDS)),
			E('div', { 'id': 'bitmesh-fleet' }, this.renderFleet(reply))
		]);
	},

	handleSaveApply: null,
	handleSave: null,
	handleReset: null
});
