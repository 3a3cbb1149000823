'use strict';
'require view';
'require form';
'require uci';
'require tools.widgets as widgets';

// Settings: a form over /etc/config/bitmesh, section `config bitmesh 'main'`. Save & Apply
// commits the change; procd's reload trigger then makes the service reload, so new prices
// apply to new channels and paid clients stay online.
//
// The checks below mirror bitmesh/config.py so that most mistakes show up in the browser. The
// service checks every option again when it (re)loads and keeps its running config if one is
// wrong. An option left empty is removed from the config and the service uses its default,
// which is what each field shows as placeholder. Options shown only for one choice (the Core RPC
// credentials with Esplora, the MQTT options with MQTT off) keep their saved values while hidden
// (`retain`): switching back finds them as they were.

// Defaults and limits of bitmesh/config.py (tests/test_luci.py compares them).
var DEFAULTS = {
	"price_sat_per_mb": 1,
	"price_sat_per_minute": 10,
	"prepay_step_sat": 100,
	"demand_target_load_percent": 70,
	"demand_step_percent_per_minute": 10,
	"capacity_clients": 32,
	"uplink_margin_percent": 20,
	"uplink_deposit_sat": 50000,
	"min_deposit_sat": 5000,
	"max_deposit_sat": 200000,
	"expiry_blocks": 144,
	"settle_margin_blocks": 12,
	"zero_conf_max_sat": 20000,
	"zero_conf_total_max_sat": 100000,
	"min_conf": 1,
	"portal_port": 8088
};
var MAX_SAT = 2100000000000000;	// 21 million BTC: no amount may be larger
var DUST_SAT = 546;		// smallest deposit: the dust limit

// Per network: the bech32 prefix (human-readable part) and the first characters of base58
// P2PKH/P2SH addresses. This is a shape check only; the service decodes the address and
// verifies its checksum and its network.
var ADDRESS_PREFIXES = {
	'main': [ 'bc', '13' ],
	'test': [ 'tb', 'mn2' ],
	'signet': [ 'tb', 'mn2' ],
	'regtest': [ 'bcrt', 'mn2' ],
	'regtest-bcoin': [ 'rb', 'RG' ]
};

var LABEL = '[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?';
var HOST = new RegExp('^(?=.{1,253}$)' + LABEL + '(\\.' + LABEL + ')*\\.?$');
var IPV4 = /^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}$/;

function isAddress(network, value) {
	var p = ADDRESS_PREFIXES[network];

	if (!p || value.length > 90)
		return false;

	// bech32/bech32m: one case only, data in the 32-character alphabet
	if ((value == value.toLowerCase() || value == value.toUpperCase()) &&
	    new RegExp('^' + p[0] + '1[02-9ac-hj-np-z]{11,}$').test(value.toLowerCase()))
		return true;

	// base58check: case-sensitive, 0/O/I/l excluded
	return new RegExp('^[' + p[1] + '][1-9A-HJ-NP-Za-km-z]{25,34}$').test(value);
}

function isIPv6(value) {
	var halves = value.split('::'), groups, n;

	if (halves.length > 2)
		return false;

	groups = [].concat.apply([], halves.map(function(h) { return h === '' ? [] : h.split(':'); }));
	n = groups.length;

	// an IPv4 address may end it, standing for two groups
	if (n && IPV4.test(groups[n - 1]) && halves[halves.length - 1] !== '') {
		groups.pop();
		n++;
	}

	if (!groups.every(function(g) { return /^[0-9A-Fa-f]{1,4}$/.test(g); }))
		return false;

	return (halves.length == 2) ? n <= 7 : n == 8;
}

// A host name or an IP address (config.py: _is_host)
function isHost(value) {
	return HOST.test(value) || isIPv6(value);
}

// host:port, an IPv6 address in brackets (config.py: _split_host_port)
function isHostPort(value) {
	var hp = /^\[([0-9A-Fa-f:.]+)\]:([0-9]+)$/.exec(value) || /^([^:\[\]]+):([0-9]+)$/.exec(value);
	return !!(hp && isHost(hp[1]) && +hp[2] >= 1 && +hp[2] <= 65535);
}

// What another option of this form holds right now (as typed, before saving); its default
// when left empty.
function current(option, section_id, name) {
	var o = option.map.lookupOption(name, section_id),
	    v = o ? o[0].formvalue(o[1]) : null;

	return (v == null || v === '') ? DEFAULTS[name] : v;
}

// Validator: a whole number from min to max. A bound may be a function (option, section_id)
// reading another option, so cross-field rules hold before anything is saved. (Messages use %s:
// LuCI's %d is 32-bit and amounts go up to MAX_SAT.)
function whole(min, max, message) {
	return function(section_id, value) {
		if (value == null || value === '')
			return true;

		var lo = (typeof(min) == 'function') ? min(this, section_id) : min,
		    hi = (typeof(max) == 'function') ? max(this, section_id) : max;

		if (!/^[0-9]+$/.test(value) || +value < lo || +value > hi)
			return (message || _('Enter a whole number from %s to %s')).format(lo, hi);

		return true;
	};
}

// A bound read from another option (plus offset); its default while that one is not a number
// (it shows its own error then).
function optionValue(name, offset) {
	return function(option, section_id) {
		var v = current(option, section_id, name);
		return (/^[0-9]+$/.test(v) ? +v : DEFAULTS[name]) + (offset || 0);
	};
}

// Validator of a demand pricing floor (isFloor) or ceiling against its price `base` (config.py
// _check_demand_pricing): for a price above 0, 0 < floor <= price <= ceiling; for 0, both 0.
// Empty is 0 (the service's default), so an emptied floor is refused while the price is above 0.
function priceBand(base, isFloor) {
	return function(section_id, value) {
		var res = whole(0, MAX_SAT).call(this, section_id, value),
		    b = +current(this, section_id, base), v = +(value || 0);

		if (res !== true)
			return res;
		if (b <= 0)
			return v ? _('0 while the price is 0 (that price is not charged)') : true;
		if (isFloor)
			return (v > 0 && v <= b) ? true : _('Enter a whole number from 1 to the price (%s)').format(b);
		return (v >= b) ? true : _('Enter a whole number from the price (%s) up').format(b);
	};
}

// Validator of a flag that may not be on with flag `other` (config.py _check_uplink,
// uplink_demand_pricing_exclusive: demand pricing and uplink mode both set the price of new channels).
function exclusiveWith(other, label) {
	return function(section_id, value) {
		return (value === '1' && current(this, section_id, other) === '1')
			? _('Switch off %s first: both set the price of new channels').format(label) : true;
	};
}

// A change to this option re-checks the options whose bounds depend on it.
function recheck(names) {
	return function(ev, section_id, value) {
		names.forEach(L.bind(function(name) {
			var o = this.map.lookupOption(name, section_id);
			if (o)
				o[0].triggerValidation(o[1]);
		}, this));
	};
}

// Validator: text of at most max characters without control characters (tab and newline only
// where multiline); not only blanks where nonblank (empty is fine: the default applies).
function text(max, multiline, nonblank) {
	return function(section_id, value) {
		if (value == null || value === '')
			return true;
		if (nonblank && value.trim() === '')
			return _('Must not be blank');
		if (value.length > max)
			return _('At most %d characters').format(max);
		if ((multiline ? /[\x00-\x08\x0b-\x1f]/ : /[\x00-\x1f]/).test(value))
			return _('Control characters are not allowed');
		return true;
	};
}

// Validator: empty (the default applies) or an http:// or https:// URL with a host, a valid
// port and no credentials (those go into the RPC user and password fields).
function httpUrl(section_id, value) {
	if (value == null || value === '')
		return true;

	var m = /^https?:\/\/([^\/?#\s]+)([\/?#]\S*)?$/i.exec(value);
	if (!m)
		return _('Enter an http:// or https:// URL');
	if (m[1].indexOf('@') > -1)
		return _('No user name or password in the URL: use the RPC user and password fields');

	var hp = /^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(:([0-9]*))?$/.exec(m[1]);
	if (!hp || (hp[3] != null && hp[3] !== '' && +hp[3] > 65535))
		return _('Enter an http:// or https:// URL with a valid host and port');

	return true;
}

// --- Wi-Fi encryption of the gated network (docs/security.md: MAC+IP cloning) -----------------
// On open Wi-Fi a device can copy a paying client's MAC and IP and spend its credit: the router
// cannot tell their frames apart. OWE (WPA3 "enhanced open", `encryption owe`) gives every client
// its own keys with no password, so frames another device injects under a client's MAC fail.

// How to turn OWE on for the access points `names` (wifi-iface sections).
function oweHowto(names) {
	return _('Network > Wireless > Edit > Wireless Security > Encryption: OWE, or: %s; uci commit wireless; wifi reload. LuCI offers OWE when the installed wpad supports it.').format(
		names.map(function(n) { return 'uci set wireless.' + n + '.encryption=owe'; }).join('; '));
}


// What `option encryption` of a wifi-iface means for a client's link: [level, text]; level
// 'owe' (per-client keys, no password), 'key' (encrypted with a password or a login), 'open'.
function wifiProtection(encryption) {
	var e = String(encryption || 'none').toLowerCase().split('+')[0];

	if (e == 'owe')
		return [ 'owe', _('OWE (enhanced open): each client\'s link is encrypted with its own keys') ];
	if (/^sae/.test(e))
		return [ 'key', _('WPA3-SAE with a password (%s): each client has its own keys; only people who know the password can join').format(e) ];
	if (/^psk/.test(e))
		return [ 'key', _('WPA/WPA2 with a password (%s): anybody who knows the password can decrypt and copy other clients; OWE suits a public hotspot better').format(e) ];
	if (/^wpa/.test(e))
		return [ 'key', _('WPA Enterprise (%s): each login has its own keys').format(e) ];
	if (/^wep/.test(e))
		return [ 'open', _('WEP (%s): broken, as good as open').format(e) ];
	return [ 'open', _('open (%s): the link is not encrypted; another device can copy a paying client\'s MAC and IP address and spend its credit').format(e) ];
}

// The access points of the router's Wi-Fi (UCI `wireless`, wifi-iface sections) on `network`,
// each with what its encryption means; disabled ones and other modes are left out.
function gatedWifi(sections, network) {
	return sections.filter(function(s) {
		var nets = Array.isArray(s.network) ? s.network : String(s.network || '').split(/\s+/);
		return nets.indexOf(network) >= 0 && s.disabled != '1' && (s.mode || 'ap') == 'ap';
	}).map(function(s) {
		var p = wifiProtection(s.encryption);
		return { name: s['.name'], ssid: s.ssid || '', device: s.device || '', encryption: s.encryption || 'none',
			level: p[0], text: p[1], transition: s.owe_transition_ifname || s.owe_transition_ssid || '' };
	});
}

// The notice at the top of the page: one line per access point of the gated network.
function wifiNotice(sections, network) {
	var aps = gatedWifi(sections, network), open, items;

	if (!aps.length)
		return E('div', { 'class': 'cbi-section', 'id': 'bitmesh-wifi', 'data-level': 'none' }, [
			E('h3', _('Wi-Fi encryption of the gated network')),
			E('p', [ _('No Wi-Fi access point of this router is on the gated network "%s". If its clients use Wi-Fi from another access point, enable OWE there: on open Wi-Fi another device can copy a paying client\'s MAC and IP address and spend its credit.').format(network) ])
		]);

	open = aps.filter(function(a) { return a.level == 'open'; });
	items = aps.map(function(a) {
		var text = a.text;
		if (a.level == 'open' && a.transition)
			text += ' ' + _('(OWE transition mode with %s: devices that support OWE join the encrypted one; older ones stay on this open one, unprotected)').format(a.transition);
		// strings in an array are text to LuCI's E() (a lone string would be HTML: an SSID is input)
		return E('li', { 'data-iface': a.name, 'data-level': a.level },
			[ '%s%s: %s'.format(a.ssid ? '"' + a.ssid + '"' : a.name, a.device ? ' (' + a.device + ')' : '', text) ]);
	});

	return E('div', { 'class': 'cbi-section', 'id': 'bitmesh-wifi',
		'data-level': open.length ? 'open' : aps.every(function(a) { return a.level == 'owe'; }) ? 'owe' : 'key' }, [
		E('h3', _('Wi-Fi encryption of the gated network')),
		E('ul', items),
		open.length ? E('div', { 'class': 'alert-message warning' }, [
			E('p', [ _('Open Wi-Fi: a device nearby can copy a paying client\'s MAC and IP address and spend its credit; the client\'s session page shows such concurrent use, but only encryption stops it. Enable OWE (WPA3 enhanced open: no password, each client\'s link encrypted with its own keys): %s Devices without OWE cannot join an OWE-only network; OWE transition mode (an open and an OWE interface that name each other in owe_transition_ifname) keeps them on the open one, unprotected.').format(
				oweHowto(open.map(function(a) { return a.name; }))) ])
		]) : ''
	]);
}

return view.extend({
	// The router's Wi-Fi, to say whether the gated network's is encrypted (rpcd ACL: uci read wireless).
	load: function() {
		return Promise.all([ uci.load('bitmesh'), uci.load('wireless') ]).catch(function() { return null; });
	},

	render: function(loaded) {
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
		s.tab('uplink', _('Uplink (resale)'));

		// --- General ---
		o = s.taboption('general', form.Flag, 'enabled', _('Enable'),
			_('The hotspot runs only while this is on and a payout address is set.'));
		o.rmempty = false;
		o.onchange = recheck([ 'payout_address' ]);

		o = s.taboption('general', widgets.NetworkSelect, 'interface', _('Gated network'),
			_('Clients of this network must pay; BitMesh\'s firewall table applies to it only.'));
		o.nocreate = true;
		o.rmempty = false;
		o.validate = function(section_id, value) {
			return (value == null || value === '' || /^[A-Za-z0-9_.-]{1,15}$/.test(value)) ? true
				: _('Network names of up to 15 letters, digits, _ . - only');
		};

		o = s.taboption('general', form.ListValue, 'network', _('Bitcoin network'));
		o.value('main', _('Bitcoin (mainnet)'));
		o.value('test', 'testnet');
		o.value('signet', 'signet');
		o.value('regtest', 'regtest');
		o.value('regtest-bcoin', 'regtest (bcoin)');
		o.default = 'main';
		o.onchange = recheck([ 'payout_address' ]);

		// not rmempty = false: LuCI would refuse an empty address before the rule below lets it
		// through while the hotspot is disabled (a fresh install could not save anything)
		o = s.taboption('general', form.Value, 'payout_address', _('Payout address'),
			_('Your address: every settlement pays your earnings here.'));
		o.validate = function(section_id, value) {
			var network = current(this, section_id, 'network') || 'main';

			// may stay empty while the hotspot is off, e.g. to set prices first
			if (value == null || value === '')
				return (current(this, section_id, 'enabled') == '1') ? _('A payout address is required to enable the hotspot') : true;

			return isAddress(network, value) ? true
				: _('Not an address of the %s network').format(network);
		};

		o = s.taboption('general', form.Value, 'state_dir', _('State directory'),
			_('Channel keys (seed, mode 0600) and the payment journal. Keep it on persistent storage.'));
		o.placeholder = '/etc/bitmesh';
		o.validate = function(section_id, value) {
			if (value == null || value === '')
				return true;
			return (value.charAt(0) == '/' && value.indexOf('\0') < 0 && value.split('/').indexOf('..') < 0) ? true
				: _('Enter an absolute path without ".."');
		};

		// --- Prices ---
		o = s.taboption('prices', form.Value, 'price_sat_per_mb', _('Price per MB (sat)'),
			_('0 for no data price. At least one of the two prices must be above 0.'));
		o.placeholder = DEFAULTS.price_sat_per_mb;
		o.validate = function(section_id, value) {
			var res = whole(0, MAX_SAT).call(this, section_id, value);
			if (res !== true)
				return res;
			if (+current(this, section_id, 'price_sat_per_mb') <= 0 &&
			    +current(this, section_id, 'price_sat_per_minute') <= 0)
				return _('Set a price per MB or per minute');
			return true;
		};
		o.onchange = recheck([ 'price_floor_sat_per_mb', 'price_ceiling_sat_per_mb' ]);

		o = s.taboption('prices', form.Value, 'price_sat_per_minute', _('Price per minute (sat)'),
			_('0 for no time price.'));
		o.placeholder = DEFAULTS.price_sat_per_minute;
		o.validate = whole(0, MAX_SAT);
		o.onchange = recheck([ 'price_sat_per_mb', 'price_floor_sat_per_minute', 'price_ceiling_sat_per_minute' ]);

		o = s.taboption('prices', form.Value, 'prepay_step_sat', _('Prepay step (sat)'),
			_('Credit a client pays ahead of use: the most an unpaid step can cost you. At most the minimum deposit.'));
		o.placeholder = DEFAULTS.prepay_step_sat;
		o.validate = whole(1, optionValue('min_deposit_sat'),
			_('Enter a whole number from %s to the minimum deposit (%s)'));

		// Demand pricing (bitmesh/market/pricing.py): the checks of config.py's _check_demand_pricing
		o = s.taboption('prices', form.Flag, 'demand_pricing', _('Demand pricing'),
			_('New channels\' prices follow the load (paid clients over capacity): the floor with no client, the prices above at the target load, the ceiling at full capacity, moving at most the step per minute. A channel keeps the price it opened with; Status shows the current price.'));
		o.validate = exclusiveWith('uplink_enabled', _('uplink mode'));
		o.onchange = recheck([ 'uplink_enabled' ]);

		o = s.taboption('prices', form.Value, 'price_floor_sat_per_mb', _('Floor per MB (sat)'),
			_('Above 0 and at most the price; 0 while that price is 0.'));
		o.depends('demand_pricing', '1');
		o.retain = true;
		o.validate = priceBand('price_sat_per_mb', true);
		o.onchange = recheck([ 'price_ceiling_sat_per_mb' ]);

		o = s.taboption('prices', form.Value, 'price_ceiling_sat_per_mb', _('Ceiling per MB (sat)'),
			_('At least the price; 0 while that price is 0.'));
		o.depends('demand_pricing', '1');
		o.retain = true;
		o.validate = priceBand('price_sat_per_mb', false);
		o.onchange = recheck([ 'price_floor_sat_per_mb' ]);

		o = s.taboption('prices', form.Value, 'price_floor_sat_per_minute', _('Floor per minute (sat)'),
			_('Above 0 and at most the price; 0 while that price is 0.'));
		o.depends('demand_pricing', '1');
		o.retain = true;
		o.validate = priceBand('price_sat_per_minute', true);
		o.onchange = recheck([ 'price_ceiling_sat_per_minute' ]);

		o = s.taboption('prices', form.Value, 'price_ceiling_sat_per_minute', _('Ceiling per minute (sat)'),
			_('At least the price; 0 while that price is 0.'));
		o.depends('demand_pricing', '1');
		o.retain = true;
		o.validate = priceBand('price_sat_per_minute', false);
		o.onchange = recheck([ 'price_floor_sat_per_minute' ]);

		o = s.taboption('prices', form.Value, 'capacity_clients', _('Capacity (paid clients)'),
			_('Clients this hotspot serves well at once: full load for demand pricing.'));
		o.depends('demand_pricing', '1');
		o.retain = true;
		o.placeholder = DEFAULTS.capacity_clients;
		o.validate = whole(1, 100000);

		o = s.taboption('prices', form.Value, 'demand_target_load_percent', _('Target load (%)'),
			_('Load at which the prices above apply.'));
		o.depends('demand_pricing', '1');
		o.retain = true;
		o.placeholder = DEFAULTS.demand_target_load_percent;
		o.validate = whole(1, 99);

		o = s.taboption('prices', form.Value, 'demand_step_percent_per_minute', _('Step (% of floor..ceiling per minute)'),
			_('The most a price moves in one minute.'));
		o.depends('demand_pricing', '1');
		o.retain = true;
		o.placeholder = DEFAULTS.demand_step_percent_per_minute;
		o.validate = whole(1, 100);

		// --- Channels ---
		o = s.taboption('channels', form.Value, 'min_deposit_sat', _('Minimum deposit (sat)'),
			_('At least %d, the dust limit.').format(DUST_SAT));
		o.placeholder = DEFAULTS.min_deposit_sat;
		o.validate = whole(DUST_SAT, MAX_SAT);
		o.onchange = recheck([ 'max_deposit_sat', 'prepay_step_sat' ]);

		o = s.taboption('channels', form.Value, 'max_deposit_sat', _('Maximum deposit (sat)'),
			_('At least the minimum deposit.'));
		o.placeholder = DEFAULTS.max_deposit_sat;
		o.validate = whole(optionValue('min_deposit_sat'), MAX_SAT,
			_('Enter a whole number from the minimum deposit (%s) to %s'));

		o = s.taboption('channels', form.Value, 'expiry_blocks', _('Channel lifetime (blocks)'),
			_('144 blocks is about a day; the client\'s refund unlocks after it.'));
		o.placeholder = DEFAULTS.expiry_blocks;
		o.validate = whole(2, MAX_SAT);
		o.onchange = recheck([ 'settle_margin_blocks' ]);

		o = s.taboption('channels', form.Value, 'settle_margin_blocks', _('Settle margin (blocks)'),
			_('Channels settle this many blocks before they expire and refuse payments inside the margin.'));
		o.placeholder = DEFAULTS.settle_margin_blocks;
		o.validate = whole(1, optionValue('expiry_blocks', -1),
			_('Enter a whole number from %s to %s, below the channel lifetime'));

		o = s.taboption('channels', form.Value, 'zero_conf_max_sat', _('0-conf risk cap (sat)'),
			_('Deposits up to this amount are used before they confirm; larger ones wait for confirmations. 0 waits for every deposit.'));
		o.placeholder = DEFAULTS.zero_conf_max_sat;
		o.validate = whole(0, MAX_SAT);

		o = s.taboption('channels', form.Value, 'zero_conf_total_max_sat', _('0-conf total cap (sat)'),
			_('All deposits in use before they confirm, summed over every channel, stay below this; further deposits wait for confirmations. Empty: five times the per-channel cap. 0 waits for every deposit.'));
		o.placeholder = DEFAULTS.zero_conf_total_max_sat;
		o.validate = whole(0, MAX_SAT);

		o = s.taboption('channels', form.Value, 'min_conf', _('Confirmations above the cap'));
		o.placeholder = DEFAULTS.min_conf;
		o.validate = whole(1, 100);

		// --- Blockchain ---
		o = s.taboption('chain', form.ListValue, 'chain_backend', _('Backend'),
			_('Esplora is the REST API of mempool.space and electrs: no node needed on the router.'));
		o.value('esplora', _('Esplora (REST)'));
		o.value('core', _('Bitcoin Core (JSON-RPC)'));
		o.default = 'esplora';

		o = s.taboption('chain', form.Value, 'esplora_url', _('Esplora URL'));
		o.depends('chain_backend', 'esplora');
		o.retain = true;
		o.placeholder = 'https://mempool.space/api';
		o.validate = httpUrl;

		o = s.taboption('chain', form.Value, 'core_rpc_url', _('Bitcoin Core RPC URL'));
		o.depends('chain_backend', 'core');
		o.retain = true;
		o.placeholder = 'http://127.0.0.1:8332';
		o.validate = httpUrl;

		o = s.taboption('chain', form.Value, 'core_rpc_user', _('RPC user'));
		o.depends('chain_backend', 'core');
		o.retain = true;
		o.validate = text(256);

		o = s.taboption('chain', form.Value, 'core_rpc_password', _('RPC password'));
		o.depends('chain_backend', 'core');
		o.retain = true;
		o.password = true;
		o.validate = text(1024);

		// --- Portal ---
		o = s.taboption('portal', form.Value, 'portal_port', _('Portal port'),
			_('The splash page listens here on the gated network.'));
		o.placeholder = DEFAULTS.portal_port;
		o.validate = whole(1, 65535);

		o = s.taboption('portal', form.Value, 'portal_title', _('Splash page title'));
		o.placeholder = 'BitMesh Wi-Fi';
		o.validate = text(120, false, true);

		o = s.taboption('portal', form.TextValue, 'portal_text', _('Splash page text'));
		o.rows = 3;
		o.validate = text(2000, true);

		o = s.taboption('portal', form.DynamicList, 'walled_garden', _('Walled garden'),
			_('host:port pairs unpaid clients may reach, TCP and UDP, e.g. mempool.space:443 for the block explorer of their wallet; nothing else of those hosts. Limited per device. An IPv6 address goes in brackets: [2001:db8::1]:443.'));
		o.placeholder = 'mempool.space:443';
		o.validate = function(section_id, value) {
			return (value == null || value === '' || isHostPort(value)) ? true
				: _('Enter host:port, e.g. mempool.space:443 or [2001:db8::1]:443');
		};

		o = s.taboption('portal', form.DynamicList, 'walled_garden_host', _('Walled garden hosts (HTTPS)'),
			_('The older form: a host here is the same as host:443 above.'));
		o.placeholder = 'mempool.space';
		o.validate = function(section_id, value) {
			return (value == null || value === '' || isHost(value)) ? true
				: _('Enter a host name or an IP address');
		};

		// --- Marketplace ---
		o = s.taboption('mqtt', form.Flag, 'mqtt_enabled', _('Announce offers over MQTT'),
			_('Publishes this hotspot\'s signed offer (prices, limits, load), its online state and channel events (never a client\'s address or keys) to an MQTT broker, where other routers and wallets compare offers (bitmesh offers).'));

		o = s.taboption('mqtt', form.Value, 'mqtt_broker', _('Broker'), _('host:port'));
		o.depends('mqtt_enabled', '1');
		o.retain = true;
		o.placeholder = '127.0.0.1:1883';
		o.validate = function(section_id, value) {
			if (value == null || value === '')
				return true;
			var hp = /^\[([0-9A-Fa-f:.]+)\]:([0-9]+)$/.exec(value) || /^([^:\[\]]+):([0-9]+)$/.exec(value);
			return (hp && isHost(hp[1]) && +hp[2] >= 1 && +hp[2] <= 65535) ? true
				: _('Enter host:port, e.g. 127.0.0.1:1883 or [::1]:1883');
		};

		o = s.taboption('mqtt', form.Value, 'mqtt_topic_prefix', _('Topic prefix'));
		o.depends('mqtt_enabled', '1');
		o.retain = true;
		o.placeholder = 'bitmesh';
		o.validate = function(section_id, value) {
			if (value == null || value === '')
				return true;
			return (value.length <= 200 && /^[^#+\0\/]+(\/[^#+\0\/]+)*$/.test(value)) ? true
				: _('A topic without #, + or empty levels');
		};

		o = s.taboption('mqtt', form.Value, 'mqtt_username', _('Broker user name'), _('Empty: no login'));
		o.depends('mqtt_enabled', '1');
		o.retain = true;
		o.validate = text(256);

		o = s.taboption('mqtt', form.Value, 'mqtt_password', _('Broker password'));
		o.depends('mqtt_enabled', '1');
		o.retain = true;
		o.password = true;
		o.validate = text(1024);

		o = s.taboption('mqtt', form.Flag, 'mqtt_tls', _('TLS'), _('Encrypt the connection to the broker and check its certificate'));
		o.depends('mqtt_enabled', '1');
		o.retain = true;

		o = s.taboption('mqtt', form.Value, 'mqtt_ca_file', _('CA certificate file'),
			_('PEM file that signed the broker\'s certificate; empty: the system\'s CAs'));
		o.depends('mqtt_tls', '1');
		o.retain = true;
		o.placeholder = '/etc/ssl/certs/ca-certificates.crt';
		o.validate = function(section_id, value) {
			if (value == null || value === '')
				return true;
			return (value.charAt(0) == '/' && value.indexOf('\0') < 0 && value.split('/').indexOf('..') < 0) ? true
				: _('Enter an absolute path without ".."');
		};

		o = s.taboption('mqtt', form.DynamicList, 'fleet_nodes', _('Fleet nodes'),
			_('Node ids of your own routers for the Fleet page; empty: every node on the broker'));
		o.depends('mqtt_enabled', '1');
		o.retain = true;
		o.placeholder = '0123456789abcdef';
		o.validate = function(section_id, value) {
			return (value == null || value === '' || /^[0-9A-Fa-f]{16}$/.test(value)) ? true
				: _('A node id is 16 hex digits');
		};

		// --- Uplink (resale) ---
		o = s.taboption('uplink', form.Flag, 'uplink_enabled', _('Resell an upstream BitMesh hotspot'),
			_('This router\'s WAN is a client of another BitMesh hotspot: it pays that hotspot from its own wallet (fund the deposit address shown on the Status page) and resells to its clients at the margin below. When the budget or the wallet runs out it stops selling and its clients lose access.'));
		o.validate = exclusiveWith('demand_pricing', _('demand pricing'));
		o.onchange = recheck([ 'demand_pricing' ]);

		o = s.taboption('uplink', form.Value, 'uplink_portal', _('Upstream portal'),
			_('e.g. http://192.168.8.1:8088; empty: the WAN\'s default gateway\'s portal. With MQTT on, the verified offers on the broker whose portals answer from the WAN are candidates too: each new uplink channel is opened with the cheapest.'));
		o.depends('uplink_enabled', '1');
		o.retain = true;
		o.validate = httpUrl;

		o = s.taboption('uplink', form.Value, 'uplink_margin_percent', _('Margin (%)'),
			_('Resale price = upstream price x (1 + margin), rounded up to whole satoshis.'));
		o.depends('uplink_enabled', '1');
		o.retain = true;
		o.placeholder = DEFAULTS.uplink_margin_percent;
		o.validate = whole(0, 1000);

		o = s.taboption('uplink', form.Value, 'uplink_budget_sat', _('Budget (sat)'),
			_('The most ever spent upstream, all uplink channels together.'));
		o.depends('uplink_enabled', '1');
		o.retain = true;
		o.rmempty = false;
		o.validate = whole(1, MAX_SAT);

		o = s.taboption('uplink', form.Value, 'uplink_deposit_sat', _('Deposit per uplink channel (sat)'),
			_('Locked in each uplink channel; what is not spent comes back to the wallet.'));
		o.depends('uplink_enabled', '1');
		o.retain = true;
		o.placeholder = DEFAULTS.uplink_deposit_sat;
		o.validate = whole(DUST_SAT, MAX_SAT);

		return m.render().then(function(node) {
			var wifi = loaded ? wifiNotice(uci.sections('wireless', 'wifi-iface'), uci.get('bitmesh', 'main', 'interface') || 'lan')
				: E('div', { 'class': 'cbi-section', 'id': 'bitmesh-wifi', 'data-level': 'unknown' }, E('p', _('The Wi-Fi configuration could not be read.')));
			var descr = node.querySelector('.cbi-map-descr');  // under the page's title and text
			node.insertBefore(wifi, descr && descr.parentNode === node ? descr.nextSibling : node.firstChild);
			return node;
		});
	}
});
