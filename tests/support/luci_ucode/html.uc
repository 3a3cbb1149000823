// ucode's `html` module (OpenWrt's ucode-mod-html, C in LuCI's contrib tree, not among the source
// tarballs), as far as LuCI 24.10's dispatcher and templates use it: striptags and entityencode.

'use strict';

// Text with every <...> tag removed (an unterminated one up to the end).
export function striptags(s) {
	if (s == null)
		return null;

	return replace('' + s, /<[^>]*>?/g, '');
};

// Text safe inside HTML and attribute values: & < > " ' as entities.
export function entityencode(s, all) {
	if (s == null)
		return null;

	return replace('' + s, /[&<>"']/g, (c) => ({
		'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&#34;', "'": '&#39;'
	})[c]);
};
