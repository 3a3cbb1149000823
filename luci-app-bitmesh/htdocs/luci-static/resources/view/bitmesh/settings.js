'use strict';
'require view';
'require form';
'require tools.widgets as widgets';

// Settings: a form over /etc/config/bitmesh (section `main`). "Save & Apply" commits the UCI
// change; procd's reload trigger then sends the service SIGHUP, so new prices apply to new
// channels and paid clients stay online. The checks here mirror bitmesh/config.py so most
// mistakes are caught in the browser; the service checks everything again at (re)load and
// keeps its running config if anything is wrong.

// Address shapes per network (bech32 prefix, base58 first characters). Only a shape check:
// the service decodes the address and verifies its checksum.
var ADDRESS_SHAPES = {
	'main': /^(bc1[02-9ac-hj-np-z]{8,87}|[13][1-9A-HJ-NP-Za-km-z]{25,34})$/i,
	'test': /^(tb1[02-9ac-hj-np-z]{8,87}|[mn2][1-9A-HJ-NP-Za-km-z]{25,34})$/i,
	'signet': /^(tb1[02-9ac-hj-np-z]{8,87}|[mn2][1-9A-HJ-NP-Za-km-z]{25,34})$/i,
	'regtest': /^(bcrt1[02-9ac-hj-np-z]{8,87}|[mn2][1-9A-HJ-NP-Za-km-z]{25,34})$/i,
	'regtest-bcoin': /^(rb1[02-9ac-hj-np-z]{8,87}|[R][1-9A-HJ-NP-Za-km-z]{25,34})$/i
};

var HOST = /^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;

// A whole number in [min, max]. A bound may be another option of the form, read as the owner
// types ({option, fallback, offset}), so cross-field rules hold before anything is saved.
function whole(min, max, message) {
	return function(section_id, value) {
		if (value == null || value === '')
			return true;
		var lo = bound(this, section_id, min), hi = bound(this, section_id, max);
		if (!/^\d+$/.test(value) || +value < lo || (hi != null && +value > hi))
			return (message || (hi != null ? _('Enter a whole number from %d to %d') : _('Enter a whole number, at least %d')))
				.format(lo, hi);
		return true;
	};
}

function bound(option, section_id, b) {
	if (b == null || typeof b == 'number')
		return b;
	return +(other(option, section_id, b.option) || b.fallback) + (b.offset || 0);
}

function sat(min) {
	return whole(min, null, _('Enter a whole number of satoshis, at least %d'));
}

function httpUrl(section_id, value) {
	if (value == null || value === '')
		return true;
	return /^https?:\/\/[^\s/?#]+(\/[^\s]*)?$/.test(value) ? true : _('Enter an http:// or https:// URL');
}

function other(option, section_id, name) {
	var o = option.map.lookupOption(name, section_id);
	return o ? o[0].formvalue(section_id) : null;
}

return view.extend({
	render: function() {
		var m, s, o;

		m = new form.Map('bitmesh', _('BitMesh'),
			_('Pay-as-you-go Wi-Fi for bitcoin: clients open a payment channel on the splash page and pay per MB and/or per minute; the router settles on-chain to your payout address.'));

		s = m.section(form.NamedSection, 'main', 'bitmesh');
		s.addremove = false;
		s.tab('general', _('General'));
		s.tab('prices', _('Prices'));
		s.tab('channels', _('Channels'));
		s.tab('chain', _('Blockchain'));
		s.tab('portal', _('Portal'));
		s.tab('mqtt', _('Marketplace'));

		// --- general ---
		o = s.taboption('general', form.Flag, 'enabled', _('Enable'),
			_('The hotspot starts only with a payout address set.'));
		o.rmempty = false;

		o = s.taboption('general', widgets.NetworkSelect, 'interface', _('Gated network'),
			_('Clients of this network must pay; the firewall table bitmesh applies to it only.'));
		o.nocreate = true;
		o.rmempty = false;

		o = s.taboption('general', form.ListValue, 'network', _('Bitcoin network'));
		o.value('main', _('Bitcoin (mainnet)'));
		o.value('test', 'testnet');
		o.value('signet', 'signet');
		o.value('regtest', 'regtest');
		o.value('regtest-bcoin', 'regtest (bcoin)');
		o.default = 'main';

		o = s.taboption('general', form.Value, 'payout_address', _('Payout address'),
			_('Your address: every settlement pays your earnings here.'));
		o.rmempty = false;
		o.validate = function(section_id, value) {
			var network = other(this, section_id, 'network') || 'main';
			if (value == null || value === '')
				return _('A payout address is required');
			return (ADDRESS_SHAPES[network] || ADDRESS_SHAPES.main).test(value.trim()) ? true
				: _('Not an address of the %s network').format(network);
		};

		o = s.taboption('general', form.Value, 'state_dir', _('State directory'),
			_('Channel keys (seed, mode 0600) and the payment journal. Keep it on persistent storage.'));
		o.placeholder = '/etc/bitmesh';
		o.validate = function(section_id, value) {
			return (value == null || value === '' || /^\/[^\0]*$/.test(value)) ? true : _('Enter an absolute path');
		};

		// --- prices ---
		o = s.taboption('prices', form.Value, 'price_sat_per_mb', _('Price per MB (sat)'),
			_('0 for no data price. At least one price must be above 0.'));
		o.datatype = 'uinteger';
		o.validate = function(section_id, value) {
			var perMinute = other(this, section_id, 'price_sat_per_minute');
			if (+(value || 0) <= 0 && +(perMinute || 0) <= 0)
				return _('Set a price per MB or per minute');
			return sat(0).call(this, section_id, value);
		};

		o = s.taboption('prices', form.Value, 'price_sat_per_minute', _('Price per minute (sat)'),
			_('0 for no time price.'));
		o.datatype = 'uinteger';
		o.validate = sat(0);

		o = s.taboption('prices', form.Value, 'prepay_step_sat', _('Prepay step (sat)'),
			_('Credit a client pays ahead of use: the most an unpaid step can cost you. At most the minimum deposit.'));
		o.datatype = 'uinteger';
		o.validate = whole(1, { option: 'min_deposit_sat', fallback: 5000 },
			_('Enter a whole number from %d to the minimum deposit (%d)'));

		// --- channels ---
		o = s.taboption('channels', form.Value, 'min_deposit_sat', _('Minimum deposit (sat)'),
			_('At least 546, the dust limit.'));
		o.datatype = 'uinteger';
		o.validate = sat(546);

		o = s.taboption('channels', form.Value, 'max_deposit_sat', _('Maximum deposit (sat)'));
		o.datatype = 'uinteger';
		o.validate = whole({ option: 'min_deposit_sat', fallback: 546 }, null, _('Must be at least the minimum deposit (%d)'));

		o = s.taboption('channels', form.Value, 'expiry_blocks', _('Channel lifetime (blocks)'),
			_('144 blocks is about a day; the client\'s refund unlocks after it.'));
		o.validate = whole(2);

		o = s.taboption('channels', form.Value, 'settle_margin_blocks', _('Settle margin (blocks)'),
			_('Channels settle this many blocks before they expire and refuse payments inside the margin.'));
		o.validate = whole(1, { option: 'expiry_blocks', fallback: 144, offset: -1 },
			_('Enter a whole number from %d to %d, below the lifetime'));

		o = s.taboption('channels', form.Value, 'zero_conf_max_sat', _('0-conf risk cap (sat)'),
			_('Deposits up to this amount are used before they confirm; larger ones wait for confirmations.'));
		o.datatype = 'uinteger';
		o.validate = sat(0);

		o = s.taboption('channels', form.Value, 'min_conf', _('Confirmations above the cap'));
		o.validate = whole(1, 100);

		// --- chain ---
		o = s.taboption('chain', form.ListValue, 'chain_backend', _('Backend'),
			_('Esplora is the REST API of mempool.space and electrs: no node needed on the router.'));
		o.value('esplora', _('Esplora (REST)'));
		o.value('core', _('Bitcoin Core (JSON-RPC)'));
		o.default = 'esplora';

		o = s.taboption('chain', form.Value, 'esplora_url', _('Esplora URL'));
		o.depends('chain_backend', 'esplora');
		o.placeholder = 'https://mempool.space/api';
		o.validate = httpUrl;

		o = s.taboption('chain', form.Value, 'core_rpc_url', _('Bitcoin Core RPC URL'));
		o.depends('chain_backend', 'core');
		o.placeholder = 'http://127.0.0.1:8332';
		o.validate = httpUrl;

		o = s.taboption('chain', form.Value, 'core_rpc_user', _('RPC user'));
		o.depends('chain_backend', 'core');

		o = s.taboption('chain', form.Value, 'core_rpc_password', _('RPC password'));
		o.depends('chain_backend', 'core');
		o.password = true;

		// --- portal ---
		o = s.taboption('portal', form.Value, 'portal_port', _('Portal port'));
		o.datatype = 'port';
		o.placeholder = '8088';

		o = s.taboption('portal', form.Value, 'portal_title', _('Splash page title'));
		o.placeholder = 'BitMesh Wi-Fi';

		o = s.taboption('portal', form.TextValue, 'portal_text', _('Splash page text'));
		o.rows = 3;

		o = s.taboption('portal', form.DynamicList, 'walled_garden_host', _('Walled garden'),
			_('Hosts unpaid clients may reach (rate-limited), e.g. a block explorer for their wallet.'));
		o.validate = function(section_id, value) {
			return (value == null || value === '' || HOST.test(value) || /^[0-9a-fA-F:.]+$/.test(value)) ? true
				: _('Enter a host name or an IP address');
		};

		// --- marketplace ---
		o = s.taboption('mqtt', form.Flag, 'mqtt_enabled', _('Announce offers over MQTT'));

		o = s.taboption('mqtt', form.Value, 'mqtt_broker', _('Broker'), _('host:port'));
		o.depends('mqtt_enabled', '1');
		o.placeholder = '127.0.0.1:1883';
		o.validate = function(section_id, value) {
			if (value == null || value === '')
				return true;
			var m = /^(\[[0-9a-fA-F:]+\]|[^:\s]+):(\d{1,5})$/.exec(value);
			return (m && +m[2] >= 1 && +m[2] <= 65535) ? true : _('Enter host:port');
		};

		o = s.taboption('mqtt', form.Value, 'mqtt_topic_prefix', _('Topic prefix'));
		o.depends('mqtt_enabled', '1');
		o.placeholder = 'bitmesh';
		o.validate = function(section_id, value) {
			return (value == null || value === '' || /^[^#+\0/]+(\/[^#+\0/]+)*$/.test(value)) ? true
				: _('No #, + or empty levels');
		};

		return m.render();
	}
});
