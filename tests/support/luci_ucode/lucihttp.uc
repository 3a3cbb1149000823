// ucode's `lucihttp` module (OpenWrt's liblucihttp-ucode, C, not among the source tarballs),
// ported from lucihttp's lib/utils.c and lib/urlencoded-parser.c for what LuCI 24.10's
// luci.http uses: urlencode, urldecode, header_attribute and the urlencoded parser. The
// multipart parser (file uploads only) is not ported: it raises.

'use strict';

export const ENCODE_FULL = 1, ENCODE_IF_NEEDED = 2, ENCODE_SPACE_PLUS = 4;
export const DECODE_STRICT = 1, DECODE_IF_NEEDED = 2, DECODE_KEEP_PLUS = 4, DECODE_PLUS = 8;

const UNRESERVED = /^[!'()*\-._~0-9A-Za-z]$/;
const RESERVED = /^[#$&+,\/:;=?@]$/;

// lh_urlencode: every byte but the unreserved ones as %XX (the reserved ones only with
// ENCODE_FULL); with ENCODE_IF_NEEDED null when nothing needed encoding.
export function urlencode(s, flags) {
	if (s == null)
		return null;
	if (type(s) != 'string')
		die('Invalid input string');

	flags = +(flags ?? 0);

	let out = '', changed = false;

	for (let i = 0; i < length(s); i++) {
		let c = substr(s, i, 1);

		if (c == ' ' && (flags & ENCODE_SPACE_PLUS)) {
			out += '+';
			changed = true;
		}
		else if (match(c, UNRESERVED) || (match(c, RESERVED) && !(flags & ENCODE_FULL))) {
			out += c;
		}
		else {
			out += sprintf('%%%02X', ord(s, i));
			changed = true;
		}
	}

	return (changed || !(flags & ENCODE_IF_NEEDED)) ? out : null;
};

// lh_urldecode: %XX to its byte ('+' to a space with DECODE_PLUS); a bad escape stays as it
// is (null with DECODE_STRICT); with DECODE_IF_NEEDED null when nothing was decoded.
export function urldecode(s, flags) {
	if (s == null)
		return null;
	if (type(s) != 'string')
		die('Invalid input string');

	flags = +(flags ?? 0);

	let out = '', changed = false;

	for (let i = 0; i < length(s); i++) {
		let c = substr(s, i, 1), hexpair = substr(s, i + 1, 2);

		if (c == '%' && match(hexpair, /^[0-9A-Fa-f]{2}$/)) {
			out += chr(hex(hexpair));
			i += 2;
			changed = true;
		}
		else if (c == '%' && (flags & DECODE_STRICT)) {
			return null;
		}
		else if (c == '+' && (flags & DECODE_PLUS) && !(flags & DECODE_KEEP_PLUS)) {
			out += ' ';
			changed = true;
		}
		else {
			out += c;
		}
	}

	return (changed || !(flags & DECODE_IF_NEEDED)) ? out : null;
};

const TSPECIAL = '()<>@,;:\\"/[]?=';

function token_ok(t) {
	for (let i = 0; i < length(t); i++) {
		let c = ord(t, i);

		if (c <= 32 || c > 126 || index(TSPECIAL, chr(c)) >= 0)
			return false;
	}

	return length(t) > 0;
}

// lh_header_attribute: of a header value `type/sub; name=value; name="quoted"`, the type
// (attr null) or the value of attribute `attr` (case-insensitive), URL-decoded with '\"' as '"';
// null when absent or malformed.
export function header_attribute(s, attr) {
	if (s == null)
		return null;
	if (type(s) != 'string')
		die('Invalid input string');
	if (attr != null && type(attr) != 'string')
		die('Invalid attribute string');

	// split at ';' (or CR) outside quotes
	let parts = [], cur = '', quoted = false;

	for (let i = 0; i < length(s); i++) {
		let c = substr(s, i, 1);

		if (c == '"' && (i == 0 || substr(s, i - 1, 1) != '\\'))
			quoted = !quoted;

		if (!quoted && (c == ';' || c == '\r')) {
			push(parts, cur);
			cur = '';
		}
		else {
			cur += c;
		}
	}

	push(parts, cur);

	let typ = trim(parts[0], ' \t');
	let halves = split(typ, '/');

	if (length(halves) > 2 || !token_ok(halves[0]) || (length(halves) == 2 && !token_ok(halves[1])))
		return null;

	if (attr == null)
		return typ;

	for (let p in slice(parts, 1)) {
		p = ltrim(p, ' \t\r');

		if (p == '')
			continue;

		let eq = index(p, '=');

		if (eq < 1 || !token_ok(substr(p, 0, eq)))
			return null;

		let name = substr(p, 0, eq), value = substr(p, eq + 1);

		if (substr(value, 0, 1) == '"') {
			let m = match(value, /^"((\\"|[^"])*)"[ \t]*$/);

			if (!m)
				return null;

			value = m[1];
		}
		else if (value != '' && !token_ok(value)) {
			return null;
		}

		if (lc(name) == lc(attr))
			return replace(urldecode(value, DECODE_KEEP_PLUS), '\\"', '"');
	}

	return null;
};

// lh_urldec in buffering mode (LuCI's callbacks answer true to TUPLE): the body is collected
// until parse(null) (EOF), then every `name=value` tuple separated by '&' is reported as TUPLE,
// NAME, VALUE; a value over the size limit is an ERROR.
export function urlencoded_parser(cb, limit) {
	if (cb != null && type(cb) != 'function')
		die('Invalid callback argument');

	const T = { TUPLE: 0, NAME: 1, VALUE: 2, EOF: 3, ERROR: 4 };
	let buf = '', done = false;

	return {
		...T,

		parse: function(chunk) {
			if (chunk != null && type(chunk) != 'string')
				die('Invalid input string');

			if (done) {
				if (chunk != null && chunk != '' && cb)
					cb(T.ERROR, 'At end of body, expected EOF, but got trailing junk', 0);
				return chunk == null || chunk == '';
			}

			if (chunk != null) {
				buf += chunk;
				return true;
			}

			done = true;

			for (let tuple in split(buf, '&')) {
				let eq = index(tuple, '='),
				    name = (eq < 0) ? tuple : substr(tuple, 0, eq),
				    value = (eq < 0) ? null : substr(tuple, eq + 1);

				if (limit && (length(name) > limit || length(value ?? '') > limit)) {
					if (cb)
						cb(T.ERROR, 'the key or value exceeds the maximum allowed size', 0);
					return false;
				}

				if (cb)
					cb(T.TUPLE, null, 0);

				if (name != '' && cb) {
					cb(T.NAME, name, length(name));
					cb(T.VALUE, (value == '') ? null : value, length(value ?? ''));
				}
			}

			if (cb)
				cb(T.EOF, null, 0);

			return true;
		}
	};
};

export function multipart_parser(boundary, cb, limit) {
	die('lucihttp multipart parser not available here (file uploads)');
};
