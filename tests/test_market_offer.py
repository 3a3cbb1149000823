"""Signed offers and event payloads (bitmesh.market: offer, identity, events, browse.select):
pure, no broker. Each refusal code of verify_offer, the canonical form, the node_id binding."""

from __future__ import annotations

import json
import secrets

import pytest
from bitcoin.core import CMutableTransaction, COutPoint, CTxIn, CTxOut
from bitcoin.wallet import CKey

from bitmesh.channel.keys import ChannelKeychain
from bitmesh.channel.state import Channel, Phase
from bitmesh.channel.wire import FEE_POLICY
from bitmesh.market import events
from bitmesh.market.browse import parse_broker, select
from bitmesh.market.identity import NODE_KEY_INDEX, node_id_of, node_key
from bitmesh.market.offer import (
    MAX_FUTURE_MS,
    MAX_OFFER_BYTES,
    OFFER_TTL_MS,
    OfferError,
    Terms,
    canonical,
    effective_msat_per_mb,
    encode,
    make_offer,
    offer_digest,
    verify_offer,
)

NOW = 1_790_000_000_000
TERMS = Terms(network="regtest", sat_per_mb=1000, sat_per_minute=5, prepay_step_sat=500, min_deposit_sat=2000,
              max_deposit_sat=1_000_000, fee_policy=dict(FEE_POLICY), load=3, capacity=32,
              portal_url="http://10.0.0.1:8088/", ssid="Café BitMesh")


def _key() -> CKey:
    return node_key(ChannelKeychain(secrets.token_bytes(32)))


def _resign(key: CKey, offer: dict) -> bytes:
    body = {k: v for k, v in offer.items() if k != "sig"}
    return encode({**body, "sig": key.sign(offer_digest(body)).hex()})


def _refused(payload: bytes, code: str, **kw) -> None:
    with pytest.raises(OfferError) as e:
        verify_offer(payload, NOW, **kw)
    assert e.value.code == code, e.value.message


def test_identity_key_is_the_one_node_id_was_always_made_of():
    """node_id (what build_service gives the portal) is the identity key's, on an index no channel
    takes (channels count up from 0)."""
    seed = secrets.token_bytes(32)
    keychain = ChannelKeychain(seed)
    legacy = bytes(keychain.key(0x7FFFFFFF).pub).hex()[:16]  # service.build_service's formula
    assert node_id_of(bytes(node_key(keychain).pub)) == legacy
    assert NODE_KEY_INDEX == 0x7FFFFFFF
    assert bytes(node_key(keychain).pub) not in {bytes(keychain.key(i).pub) for i in range(8)}


def test_offer_is_canonical_signed_and_verifies():
    key = _key()
    offer = make_offer(key, TERMS, seq=NOW, now_ms=NOW)
    payload = encode(offer)
    assert payload == json.dumps(offer, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert "Café".encode() in payload and b" " not in payload.replace(b"Caf\xc3\xa9 BitMesh", b"")
    assert offer["node_id"] == node_id_of(bytes(key.pub)) and offer["pubkey"] == bytes(key.pub).hex()
    assert offer["valid_until"] == NOW + OFFER_TTL_MS and offer["fee_policy"] == FEE_POLICY
    body = {k: v for k, v in offer.items() if k != "sig"}
    assert canonical(body) in payload.replace(b',"sig":"' + offer["sig"].encode() + b'"', b"")
    assert verify_offer(payload, NOW + 1000, network="regtest") == offer
    # the digest is domain separated: not a plain hash of the body
    import hashlib
    assert offer_digest(body) != hashlib.sha256(canonical(body)).digest()


@pytest.mark.parametrize("change, code", [
    (lambda o: {**o, "sat_per_mb": 1}, "offer_signature_invalid"),  # tampered price
    (lambda o: {**o, "ssid": "evil"}, "offer_signature_invalid"),
    (lambda o: {**o, "sig": "00"}, "offer_signature_invalid"),
    (lambda o: {**o, "sig": "zz"}, "offer_field_invalid"),
    (lambda o: {**o, "sat_per_mb": "1000"}, "offer_field_invalid"),
    (lambda o: {**o, "load": True}, "offer_field_invalid"),
    (lambda o: {**o, "capacity": -1}, "offer_field_invalid"),
    (lambda o: {k: v for k, v in o.items() if k != "network"}, "offer_field_invalid"),
    (lambda o: {**o, "fee_policy": None}, "offer_field_invalid"),
    (lambda o: {**o, "pubkey": "04" + "11" * 32}, "offer_field_invalid"),
    (lambda o: {**o, "version": 2}, "offer_version_unsupported"),
])
def test_a_changed_offer_is_refused(change, code):
    offer = make_offer(_key(), TERMS, seq=NOW, now_ms=NOW)
    _refused(encode(change(offer)), code)


def test_another_key_cannot_claim_a_node_id():
    """A forger signs with its own key: either the node_id is its key's (not the victim's), or
    the node_id is the victim's and the key does not match it."""
    victim, forger = _key(), _key()
    real = make_offer(victim, TERMS, seq=NOW, now_ms=NOW)
    forged = make_offer(forger, TERMS, seq=NOW + 1, now_ms=NOW)
    _refused(_resign(forger, {**forged, "node_id": real["node_id"]}), "offer_node_id_mismatch")
    # the victim's pubkey with the forger's signature
    _refused(_resign(forger, {**forged, "node_id": real["node_id"], "pubkey": real["pubkey"]}),
             "offer_signature_invalid")


def test_stale_future_network_malformed_and_oversized_offers_are_refused():
    key = _key()
    offer = make_offer(key, TERMS, seq=NOW, now_ms=NOW)
    _refused(encode(offer), "offer_network_mismatch", network="main")
    with pytest.raises(OfferError) as e:
        verify_offer(encode(offer), NOW + OFFER_TTL_MS)
    assert e.value.code == "offer_stale"
    ahead = make_offer(key, TERMS, seq=NOW, now_ms=NOW + MAX_FUTURE_MS + 1)
    _refused(encode(ahead), "offer_future")
    assert verify_offer(encode(make_offer(key, TERMS, seq=NOW, now_ms=NOW + MAX_FUTURE_MS)), NOW)
    for junk in (b"{", b"[]", b"\xff\xfe", b"null"):
        _refused(junk, "offer_malformed")
    big = make_offer(key, Terms(**{**TERMS.__dict__, "fee_policy": {"x": "y" * MAX_OFFER_BYTES}}), NOW, NOW)
    _refused(encode(big), "offer_too_large")


def test_select_keeps_the_newest_valid_offer_per_node_cheapest_first():
    a, b = _key(), _key()
    old_a = make_offer(a, TERMS, seq=NOW - 5, now_ms=NOW - 5)
    new_a = make_offer(a, Terms(**{**TERMS.__dict__, "sat_per_mb": 3000}), seq=NOW, now_ms=NOW)
    cheap_b = make_offer(b, Terms(**{**TERMS.__dict__, "sat_per_mb": 10, "sat_per_minute": 100}), NOW, NOW)
    stale = make_offer(_key(), TERMS, seq=NOW - OFFER_TTL_MS - 1, now_ms=NOW - OFFER_TTL_MS - 1)
    forged = {**make_offer(b, TERMS, NOW + 1, NOW), "sat_per_mb": 0}
    p = "bitmesh/v1"
    msgs = [(f"{p}/{a_id}/offer", encode(o)) for a_id, o in (
        (old_a["node_id"], old_a), (new_a["node_id"], new_a), (cheap_b["node_id"], cheap_b),
        (stale["node_id"], stale), (cheap_b["node_id"], forged), (cheap_b["node_id"], new_a))]
    msgs += [(f"{p}/{new_a['node_id']}/state", b'{"state":"offline"}'), ("other/v1/x/offer", b"junk")]
    offers, dropped = select(msgs, "bitmesh", NOW + 10)
    assert [o["node_id"] for o in offers] == [cheap_b["node_id"], new_a["node_id"]]
    assert offers[1]["sat_per_mb"] == 3000 and offers[1]["state"] == "offline" and offers[0]["state"] == "unknown"
    assert offers[0]["effective_msat_per_mb"] == 10 * 1000 + 100 * 1000 // 10 == effective_msat_per_mb(cheap_b)
    assert dropped == {"offer_stale": 1, "offer_signature_invalid": 1, "offer_topic_mismatch": 1}


def test_parse_broker():
    assert parse_broker("mqtt://127.0.0.1:1883") == ("127.0.0.1", 1883, False)
    assert parse_broker("mqtts://broker.example") == ("broker.example", 8883, True)
    assert parse_broker("10.0.0.1:1884") == ("10.0.0.1", 1884, False)
    with pytest.raises(Exception) as e:
        parse_broker("http://x:1")
    assert getattr(e.value, "code", "") == "config_invalid"


REFUND = b"\x00\x14" + b"\xcd" * 20
SETTLEMENT = CMutableTransaction([CTxIn(COutPoint(b"\xab" * 32, 0))],
                                 [CTxOut(1000, REFUND), CTxOut(30_000, b"\x00\x14" + b"\xee" * 20)]).serialize()
SECRETS = dict(client_pubkey=b"\x02" + b"\xc1" * 32, payment_sig=b"\x30" + b"\x5e" * 70, settlement_raw=SETTLEMENT,
               refund_script=REFUND)


def _channel(**kw) -> Channel:
    base = dict(id="c" * 32, key_index=1, server_pubkey=b"\x03" * 33, deposit=50_000, expiry=2000, created_at=1,
                client_mac="02:11:22:33:44:55", client_ip="10.0.0.23", sat_per_mb=1000, **SECRETS)
    return Channel(**{**base, **kw})


def test_channel_events_carry_no_client_secret():
    opened = _channel(phase=Phase.OPEN)
    paid = opened.evolve(paid=1500, bytes_used=123_456, seconds_used=30)
    closed = paid.evolve(phase=Phase.SETTLING, close_reason="client_close", settlement_txid="ee" * 32)
    out = (events.channel_events(opened, _channel(), NOW) + events.channel_events(paid, opened, NOW)
           + events.channel_events(closed, paid, NOW))
    assert [e["type"] for e in out] == ["session_start", "payment", "session_stop", "settlement"]
    assert out[1] == {"type": "payment", "channel_id": "c" * 32, "at": NOW, "paid_sat": 1500, "bytes_used": 123_456,
                      "seconds_used": 30}
    assert out[3]["owner_sat"] == 30_000 and out[3]["txid"] == "ee" * 32
    text = json.dumps(out).lower()
    for secret in [v.hex() for v in SECRETS.values()] + ["02:11:22:33:44:55", "021122334455", "10.0.0.23"]:
        assert secret not in text
    assert events.channel_events(paid, paid, NOW) == []  # a usage note alone announces nothing


def test_ssid_is_the_gated_networks_enabled_access_point(tmp_path):
    from bitmesh.market.publisher import gated_ssid

    wireless = tmp_path / "wireless"
    assert gated_ssid("lan", wireless) == ""  # no Wi-Fi config (a Pi on Ethernet, these tests)
    wireless.write_text("""
config wifi-iface 'off'
	option network 'hotspot'
	option mode 'ap'
	option ssid 'Disabled one'
	option disabled '1'

config wifi-iface 'sta'
	option network 'hotspot'
	option mode 'sta'
	option ssid 'Uplink'

config wifi-iface 'home'
	option network 'lan'
	option ssid 'Home'

config wifi-iface 'guest'
	option network 'wan6 hotspot'
	option ssid 'BitMesh Café'
""")
    assert gated_ssid("hotspot", wireless) == "BitMesh Café"
    assert gated_ssid("lan", wireless) == "Home"
    assert gated_ssid("iot", wireless) == ""
