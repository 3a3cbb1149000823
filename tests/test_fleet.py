"""The fleet view's pure core (bitmesh/market/fleet.py): the per-node and fleet sums from signed
totals, online/offline/unknown, forged or unsigned totals refused with their code and never summed,
strangers filtered by `fleet_nodes`, the bounded store a router keeps, the option's validation."""

from __future__ import annotations

import json
import secrets
from types import SimpleNamespace

import pytest

from bitmesh import config
from bitmesh.channel.keys import ChannelKeychain
from bitmesh.control import Control
from bitmesh.errors import BitMeshError
from bitmesh.market import events
from bitmesh.market.fleet import MAX_RECORD_BYTES, FleetStore, RecordError, fleet_table, summarise, verify_record
from bitmesh.market.identity import node_id_of, node_key
from bitmesh.market.offer import OFFER_TTL_MS, Terms, encode, make_offer

NOW = 1_800_000_000_000
P = "bitmesh"


class Node:
    def __init__(self):
        self.key = node_key(ChannelKeychain(secrets.token_bytes(32)))
        self.id = node_id_of(bytes(self.key.pub))

    def topic(self, kind: str) -> str:
        return f"{P}/v1/{self.id}/{kind}"

    def offer(self, at: int = NOW, sat_per_mb: int = 100, sat_per_minute: int = 2) -> tuple[str, bytes]:
        terms = Terms("regtest", sat_per_mb, sat_per_minute, 500, 2000, 1_000_000, {}, 1, 32)
        return self.topic("offer"), encode(make_offer(self.key, terms, at, at))

    def state(self, online: bool, at: int = NOW) -> tuple[str, bytes]:
        return self.topic("state"), encode(events.sign(self.key, "state", events.state_payload(self.id, online, at)))

    def totals_body(self, settled: int, settling: int = 0, open_channels: int = 1, payments: int = 3,
                    at: int = NOW) -> dict:
        earnings = {"settled_sat": settled, "settling_sat": settling, "open_paid_sat": 700, "open_owed_sat": 600,
                    "settled_channels": 2, "settling_channels": 1 if settling else 0, "open_channels": open_channels}
        return events.totals_payload(self.id, earnings, open_channels, payments, NOW - 3_600_000, at)

    def totals(self, *args, **kw) -> tuple[str, bytes]:
        return self.topic("totals"), encode(events.sign(self.key, "totals", self.totals_body(*args, **kw)))


def test_summary_sums_signed_totals_per_node_and_for_the_fleet():
    a, b = Node(), Node()
    messages = [a.state(True), a.offer(sat_per_mb=100), a.totals(1000, 200, at=NOW - 5000),
                a.totals(1500, 300, payments=7),  # newer: replaces the one above
                b.state(True), b.offer(sat_per_mb=250, sat_per_minute=0), b.totals(40, 0, open_channels=2)]
    out = summarise(messages, P, NOW)
    rows = {r["node_id"]: r for r in out["nodes"]}
    assert set(rows) == {a.id, b.id} and out["refused"] == {} and out["strangers"] == 0
    ra, rb = rows[a.id], rows[b.id]
    assert (ra["status"], ra["since"], ra["offer_verified"], ra["sat_per_mb"]) == ("online", NOW, True, 100)
    assert (ra["earned_sat"], ra["settled_sat"], ra["settling_sat"], ra["payments"]) == (1800, 1500, 300, 7)
    assert (ra["clients_now"], ra["clients_total"], ra["totals_verified"]) == (1, 4, True)
    assert (rb["sat_per_mb"], rb["sat_per_minute"], rb["clients_now"], rb["clients_total"]) == (250, 0, 2, 4)
    f = out["fleet"]
    assert (f["nodes"], f["online"], f["totals_verified"]) == (2, 2, 2)
    assert (f["earned_sat"], f["settled_sat"], f["settling_sat"]) == (1840, 1540, 300)
    assert (f["clients_now"], f["clients_total"], f["payments"], f["open_paid_sat"]) == (3, 8, 10, 1400)
    text = fleet_table(out)
    assert a.id in text and "FLEET 2" in text and "1840" in text


def test_offline_silent_and_unknown_nodes():
    will, silent, missing, live = Node(), Node(), Node(), Node()
    messages = [
        # the last will (signed when the connection began) after the node's newer offer and totals
        will.offer(at=NOW - 60_000), will.totals(10, at=NOW - 30_000), will.state(False, at=NOW - 90_000),
        # said online once, its offer has run out since: silent, hence offline
        silent.state(True, at=NOW - 2 * OFFER_TTL_MS), silent.offer(at=NOW - OFFER_TTL_MS - 1),
        silent.totals(5, at=NOW - OFFER_TTL_MS),
        live.state(True), live.offer(),
    ]
    out = summarise(messages, P, NOW, nodes=(will.id, silent.id, missing.id, live.id))
    rows = {r["node_id"]: r for r in out["nodes"]}
    assert (rows[will.id]["status"], rows[will.id]["since"]) == ("offline", NOW - 30_000)  # last seen
    assert rows[will.id]["earned_sat"] == 10  # an offline node's signed totals still count
    assert (rows[silent.id]["status"], rows[silent.id]["since"]) == ("offline", NOW - OFFER_TTL_MS)
    assert rows[silent.id]["offer_refused"] == "offer_stale" and rows[silent.id]["sat_per_mb"] is None
    assert (rows[missing.id]["status"], rows[missing.id]["earned_sat"]) == ("unknown", None)
    assert rows[live.id]["status"] == "online" and rows[live.id]["totals_verified"] is False
    assert out["fleet"]["online"] == 1 and out["fleet"]["earned_sat"] == 15


def test_forged_or_unsigned_totals_are_refused_and_never_summed():
    victim, forger = Node(), Node()
    real = victim.totals(1000)
    body = victim.totals_body(999_999)
    forged = {
        # the format before signing: anybody can write it
        "record_unsigned": encode(body),
        # the real record with its numbers changed
        "record_signature_invalid": encode({**json.loads(real[1]), "settled_sat": 999_999, "earned_sat": 999_999}),
        # the forger's own key, claiming the victim's node_id
        "record_node_id_mismatch": encode(events.sign(forger.key, "totals", body)),
        # the forger's own valid totals, published under the victim's topic
        "record_topic_mismatch": forger.totals(999_999)[1],
        # a signed state replayed as totals: another signature domain
        "record_malformed": victim.state(True)[1],
    }
    for code, payload in forged.items():
        out = summarise([victim.state(True), victim.offer(), (victim.topic("totals"), payload)], P, NOW)
        row = out["nodes"][0]
        assert out["refused"] == {code: 1}, (code, out["refused"])
        assert (row["totals_verified"], row["totals_refused"], row["earned_sat"]) == (False, code, None), code
        assert out["fleet"]["earned_sat"] == 0 and out["fleet"]["totals_verified"] == 0
        # after the real one, a forgery changes nothing
        out = summarise([real, (victim.topic("totals"), payload)], P, NOW)
        assert out["fleet"]["earned_sat"] == 1000 and out["nodes"][0]["totals_verified"], code
    # a state's signature does not make totals: the domains differ
    state_body = {**body, "state": "online"}
    sig = events.sign(victim.key, "state", state_body)
    with pytest.raises(RecordError) as e:
        verify_record("totals", encode(sig), victim.id, NOW)
    assert e.value.code == "record_signature_invalid"
    # totals dated beyond the clock skew allowed
    with pytest.raises(RecordError) as e:
        verify_record("totals", victim.totals(1, at=NOW + 3_600_000)[1], victim.id, NOW)
    assert e.value.code == "record_future"
    # a forged offer (the real one replaced): prices not trusted, status says so
    tampered = encode({**json.loads(victim.offer()[1]), "sat_per_mb": 1})
    out = summarise([victim.state(True), (victim.topic("offer"), tampered), real], P, NOW)
    row = out["nodes"][0]
    assert (row["status"], row["offer_verified"], row["offer_refused"], row["sat_per_mb"]) == (
        "unverified", False, "offer_signature_invalid", None)
    assert out["fleet"]["online"] == 0 and out["fleet"]["earned_sat"] == 1000


def test_strangers_are_filtered_by_fleet_nodes():
    mine, stranger = Node(), Node()
    messages = [mine.state(True), mine.offer(), mine.totals(100), stranger.state(True), stranger.offer(),
                stranger.totals(5000), ("bitmesh/v1/x/y/totals", b"{}"), ("other/v1/abc/totals", b"{}")]
    everyone = summarise(messages, P, NOW)
    assert everyone["fleet"]["earned_sat"] == 5100 and everyone["fleet"]["nodes"] == 2
    owner = summarise(messages, P, NOW, nodes=(mine.id,))
    assert [r["node_id"] for r in owner["nodes"]] == [mine.id]
    assert owner["fleet"]["earned_sat"] == 100 and owner["strangers"] == 1


def test_store_is_bounded_filters_on_arrival_and_follows_the_list():
    nodes = [Node() for _ in range(4)]
    wanted: tuple[str, ...] = ()
    store = FleetStore(P, lambda: wanted, max_nodes=3, clock=lambda: NOW)
    assert store.topics() == [f"{P}/v1/+/offer", f"{P}/v1/+/state", f"{P}/v1/+/totals"]
    for n in nodes:
        store.keep(*n.totals(10))
        store.keep(*n.state(True))
    store.keep("bitmesh/v1/not-a-node-id/totals", b"{}")
    assert set(store.kept()) == {n.id for n in nodes[:3]}
    assert store.dropped == 2 + 1  # node 3 (state and totals), the bad id
    # an oversized record: refused; where nothing verified before it, its code is kept (not the payload)
    store.keep(nodes[0].topic("totals"), b" " * (10 * MAX_RECORD_BYTES))
    store.keep(nodes[0].topic("offer"), b" " * (10 * MAX_RECORD_BYTES))
    assert store.kept()[nodes[0].id] == {"totals": "", "state": "", "offer": "offer_too_large"}
    out = store.summary(NOW)
    assert out["refused"] == {"offer_too_large": 1, "record_too_large": 1} and out["dropped_nodes"] == 3
    assert out["fleet"]["earned_sat"] == 30  # nodes 0, 1 and 2; node 3 not kept
    # a forgery or a replayed older record never evicts the verified one it follows
    store.keep(nodes[1].topic("totals"), encode({**json.loads(nodes[1].totals(10)[1]), "payments": 99}))
    store.keep(*nodes[1].totals(1, at=NOW - 1))
    out = store.summary(NOW)
    assert out["refused"] == {"offer_too_large": 1, "record_signature_invalid": 1, "record_too_large": 1}
    assert out["fleet"]["earned_sat"] == 30 and out["fleet"]["online"] == 0  # no offer kept: not online
    assert {r["node_id"]: r["status"] for r in out["nodes"]}[nodes[1].id] == "unverified"
    store.keep(*nodes[1].totals(30, at=NOW + 1))  # a newer one does
    assert store.summary(NOW + 1)["fleet"]["earned_sat"] == 50
    # a state goes by arrival: the last will, signed when the connection began, follows the online one
    store.keep(*nodes[1].state(False, at=NOW - 60_000))
    assert {r["node_id"]: r["status"] for r in store.summary(NOW)["nodes"]}[nodes[1].id] == "offline"
    # a reload names the fleet: strangers no longer count, nor are they kept when they publish
    wanted = (nodes[1].id,)
    assert [r["node_id"] for r in store.summary(NOW)["nodes"]] == [nodes[1].id]
    before = store.kept()
    store.keep(*nodes[2].totals(99))
    assert store.kept() == before


def test_store_checks_a_signature_once_and_expires_offers():
    node = Node()
    store = FleetStore(P, clock=lambda: NOW)
    checks = []
    check = store._check
    store._check = lambda *a: checks.append(a[1]) or check(*a)
    offer, state = node.offer(), node.state(True)
    for _ in range(3):  # the retained records again on every reconnect
        store.keep(*offer)
        store.keep(*state)
    assert checks == ["offer", "state"]
    assert store.summary(NOW)["nodes"][0]["status"] == "online"
    later = store.summary(NOW + OFFER_TTL_MS)  # its offer ran out and nothing came since: silent
    assert (later["nodes"][0]["status"], later["nodes"][0]["offer_refused"]) == ("offline", "offer_stale")
    assert later["refused"] == {"offer_stale": 1}


def test_fleet_nodes_option():
    s = config.Settings.from_dict({"fleet_nodes": ["0123456789ABCDEF", "0123456789abcdef", "fedcba9876543210"]})
    assert s.fleet_nodes == ("0123456789abcdef", "fedcba9876543210")
    assert config.Settings.from_dict({"fleet_nodes": "0123456789abcdef"}).fleet_nodes == ("0123456789abcdef",)
    assert config.Settings().fleet_nodes == () and s.public_dict()["fleet_nodes"] == list(s.fleet_nodes)
    for bad in ("0123", "0123456789abcdeg", "bitmesh/#", ""):
        with pytest.raises(config.ConfigError, match="fleet_nodes"):
            config.Settings.from_dict({"fleet_nodes": [bad]})


def test_control_fleet_needs_mqtt():
    with pytest.raises(BitMeshError) as e:
        Control(SimpleNamespace(market=None)).fleet()
    assert e.value.code == "mqtt_disabled"
