"""The control plane's pure parts and the ubus adapter's dispatch, without ubusd. The objects on
OpenWrt's real ubusd, rpcd and uhttpd are tests/test_ubus_owrt.py; the running hotspot's
(status, kick, reload, earnings, events) tests/test_hotspot_netns.py::test_owner_controls_the_hotspot_over_ubus."""

from __future__ import annotations

from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut, lx

from bitmesh.channel.contract import Outpoint
from bitmesh.channel.state import Channel, Phase
from bitmesh.control import Control, events_for, payout_of, redact_url
from bitmesh.errors import ChannelError
from bitmesh.ubus_object import METHODS, call, signatures

REFUND = b"\x00\x14" + b"\x11" * 20
PAYOUT = b"\x00\x14" + b"\x22" * 20


def _channel(**changes) -> Channel:
    base = Channel(id="c1", key_index=0, client_pubkey=b"\x02" + bytes(32), server_pubkey=b"\x03" + bytes(32),
                   deposit=50_000, expiry=2000, refund_script=REFUND, created_at=1, client_mac="02:00:00:00:00:01",
                   client_ip="10.0.0.5", funding=Outpoint("ab" * 32, 1))
    return base.evolve(**changes)


def _settlement(*outs: tuple[int, bytes]) -> bytes:
    tx = CTransaction([CTxIn(COutPoint(lx("ab" * 32), 1))], [CTxOut(v, s) for v, s in outs], 0, 2)
    return tx.serialize()


def test_redact_url_drops_credentials_only():
    assert redact_url("http://user:secret@10.0.0.2:8332/wallet") == "http://10.0.0.2:8332/wallet"
    assert redact_url("http://:secret@[fd00::2]:8332/") == "http://[fd00::2]:8332/"
    assert redact_url("https://mempool.space/api") == "https://mempool.space/api"


def test_payout_is_every_output_not_to_the_client():
    raw = _settlement((30_000, REFUND), (9_500, PAYOUT), (10_000, REFUND))
    assert payout_of(_channel(settlement_raw=raw)) == 9_500
    assert payout_of(_channel()) == 0


def test_events_follow_the_channel_phases():
    awaiting = _channel(phase=Phase.AWAITING_FUNDING)
    opened = awaiting.evolve(phase=Phase.OPEN)
    paid = opened.evolve(paid=1_000)
    raw = _settlement((49_000, REFUND), (700, PAYOUT))
    settling = paid.evolve(phase=Phase.SETTLING, settlement_txid="ee" * 32, settlement_raw=raw,
                           close_reason="owner_kick", bytes_used=123)
    assert events_for(awaiting, None) == []
    assert events_for(opened, awaiting) == [("bitmesh.session.start", {
        "channel_id": "c1", "mac": "02:00:00:00:00:01", "ip": "10.0.0.5", "deposit": 50_000})]
    assert events_for(paid, opened) == []  # a payment is not a new session
    stop, settlement = events_for(settling, paid)
    assert stop == ("bitmesh.session.stop", {"channel_id": "c1", "mac": "02:00:00:00:00:01", "ip": "10.0.0.5",
                                             "state": "settling", "reason": "owner_kick", "paid": 1_000,
                                             "bytes_used": 123, "seconds_used": 0})
    assert settlement == ("bitmesh.settlement", {"channel_id": "c1", "txid": "ee" * 32, "payout_sat": 700,
                                                 "paid": 1_000})
    assert events_for(settling.evolve(phase=Phase.SETTLED), settling) == []  # announced once


class _Stub:
    """Records what the adapter passes; refuses like the real Control does."""

    def __init__(self):
        self.calls = []

    def status(self):
        return {"running": True}

    def close_channel(self, channel_id):
        self.calls.append(channel_id)
        raise ChannelError(f"no channel {channel_id!r}", code="channel_unknown")

    def kick(self, mac):
        raise RuntimeError("bug")


def test_call_passes_only_declared_arguments_and_answers_errors_as_json():
    stub = _Stub()
    assert call(stub, "status", {"ubus_rpc_session": "0123"}) == {"running": True}  # LuCI's object
    assert call(stub, "close_channel", {"channel_id": "x", "other": 2}) == {
        "error": {"code": "channel_unknown", "message": "no channel 'x'"}}
    assert stub.calls == ["x"]
    assert call(stub, "kick", {"mac": "02:00:00:00:00:01"})["error"]["code"] == "internal_error"
    assert call(stub, "shutdown", {})["error"]["code"] == "method_unknown"


def test_every_ubus_method_is_a_control_method_with_the_same_arguments():
    import inspect

    for name, args in METHODS.items():
        params = list(inspect.signature(getattr(Control, name)).parameters)[1:]
        assert params == list(args), name
        assert set(args.values()) <= {"string", "int32", "bool"}
    assert signatures(False) == METHODS
    assert all(args == {**METHODS[m], "ubus_rpc_session": "string"} for m, args in signatures(True).items())
