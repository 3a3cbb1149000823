"""The fleet view: one owner, many routers. Pure: no I/O, no clock of its own (callers pass `now_ms`).

From what nodes publish under `<prefix>/v1/<node_id>/` (the retained offer, state and totals), a
summary per node and for the fleet: online or offline (and since when), the prices of its verified
offer, clients now and in total, earned (settled + settling) satoshis, payments.

Trust: the node_id is bound to the identity key (identity.py), and the state and totals are
signed by it (events.sign, domains "bitmesh state 1 " / "bitmesh totals 1 "), as the offer is. A
record that does not verify (unsigned, signed by another key, published under another node's
topic, malformed, from the future) is refused with a stable code, counted in `refused`, and its
numbers never enter the fleet sums: the node is shown with `totals_verified` false. Somebody with
write access to the broker can still hide a node (delete or replace its retained records, replay
an old signed state or totals): denial, not forgery; an owner's broker should restrict writes
(ACL: P/v1/<node_id>/# to that node's login).

Only the owner's nodes count: `nodes` (UCI `fleet_nodes`) names them; empty means every node on
the broker. A listed node that published nothing is shown as `unknown`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter

from bitmesh.channel import contract as c
from bitmesh.errors import BitMeshError
from bitmesh.market.events import signed_digest
from bitmesh.market.identity import NODE_ID_HEX, node_id_of
from bitmesh.market.offer import MAX_FUTURE_MS, MAX_OFFER_BYTES, OfferError, load_object, verify_offer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

KINDS = ("offer", "state", "totals")
MAX_RECORD_BYTES = MAX_OFFER_BYTES
MAX_NODES = 64  # nodes a router keeps for its fleet view (the fields shown: about 1.5 KB a node)
TOTALS_FIELDS = ("at", "earned_sat", "settled_sat", "settling_sat", "open_paid_sat", "open_owed_sat", "clients_now",
                 "clients_total", "payments", "payments_since")
SUMMED = ("earned_sat", "settled_sat", "settling_sat", "open_paid_sat", "clients_now", "clients_total", "payments")
OFFER_SHOWN = ("network", "sat_per_mb", "sat_per_minute", "load", "capacity", "portal_url")
KEPT = {"offer": ("seq", "issued_at", "valid_until", *OFFER_SHOWN), "state": ("state", "at"),
        "totals": (*SUMMED, "open_owed_sat", "at")}


class RecordError(BitMeshError):
    """A state or totals record was refused: record_too_large, record_malformed, record_unsigned,
    record_node_id_mismatch, record_signature_invalid, record_topic_mismatch, record_future."""

    code = "record_invalid"
    http_status = 400


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == NODE_ID_HEX and all(ch in "0123456789abcdef" for ch in value)


def verify_record(kind: str, payload: bytes, topic_node: str, now_ms: int,
                  max_future_ms: int = MAX_FUTURE_MS) -> dict[str, Any]:
    """The state or totals record in `payload`, if signed by the key `topic_node` stands for."""
    record = load_object(payload, MAX_RECORD_BYTES, kind, RecordError, prefix="record")
    if not isinstance(record.get("sig"), str) or not isinstance(record.get("pubkey"), str):
        raise RecordError(f"{kind} is not signed", code="record_unsigned")
    fields = TOTALS_FIELDS if kind == "totals" else ("at",)
    for name in fields:
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RecordError(f"{kind} field {name!r} missing or not a non-negative int", code="record_malformed")
    if kind == "state" and record.get("state") not in ("online", "offline"):
        raise RecordError("state must be online or offline", code="record_malformed")
    if kind == "totals" and record["earned_sat"] != record["settled_sat"] + record["settling_sat"]:
        raise RecordError("earned_sat is not settled_sat + settling_sat", code="record_malformed")
    try:
        pubkey, der = bytes.fromhex(record["pubkey"]), bytes.fromhex(record["sig"])
    except ValueError:
        raise RecordError("pubkey and sig must be hex", code="record_malformed") from None
    if len(pubkey) != 33 or pubkey[0] not in (2, 3) or record.get("node_id") != node_id_of(pubkey):
        raise RecordError(f"{kind}: node_id {record.get('node_id')!r} is not the one of its key",
                          code="record_node_id_mismatch")
    body = {k: v for k, v in record.items() if k != "sig"}
    try:
        c.check_signature(pubkey, signed_digest(kind, body), der)
    except BitMeshError as e:
        raise RecordError(f"{kind} signature refused: {e.message}", code="record_signature_invalid") from None
    if record["node_id"] != topic_node:
        raise RecordError(f"{kind} of {record['node_id']} published as {topic_node}", code="record_topic_mismatch")
    if record["at"] > now_ms + max_future_ms:
        raise RecordError(f"{kind} dated in the future", code="record_future")
    return record


def split_topic(topic: str, prefix: str) -> tuple[str, str] | None:
    """(node_id, kind) of `<prefix>/v1/<node_id>/<kind>`, or None for any other topic."""
    head = prefix.split("/")
    levels = topic.split("/")
    if len(levels) != len(head) + 3 or levels[:-2] != [*head, "v1"]:
        return None
    return levels[-2], levels[-1]


def _node(node_id: str) -> dict[str, Any]:
    return {"node_id": node_id, "status": "unknown", "since": None, "last_seen": None,
            "offer_verified": False, "offer_refused": None, "network": None, "sat_per_mb": None,
            "sat_per_minute": None, "load": None, "capacity": None, "portal_url": None,
            "totals_verified": False, "totals_refused": None, "totals_at": None,
            **{name: None for name in (*SUMMED, "open_owed_sat")}}


def summarise(messages: list[tuple[str, bytes]], prefix: str, now_ms: int, nodes: tuple[str, ...] = (),
              network: str | None = None) -> dict[str, Any]:
    """The fleet from `messages` (topic, payload), oldest first: per node its newest verified
    offer (highest seq), totals (latest `at`) and state (the last that arrived, as the broker
    retains it); `nodes` empty = every node seen. Refusals are counted by code in `refused`;
    messages of nodes outside `nodes` are counted in `strangers`, nothing else."""
    wanted = set(nodes)
    refused: Counter = Counter()
    strangers: set[str] = set()
    offers: dict[str, dict] = {}
    totals: dict[str, dict] = {}
    states: dict[str, dict] = {}
    offer_refused: dict[str, str] = {}
    totals_refused: dict[str, str] = {}
    for topic, payload in messages:
        where = split_topic(topic, prefix)
        if where is None or where[1] not in KINDS:
            continue
        node, kind = where
        if wanted and node not in wanted:
            strangers.add(node)
            continue
        if not payload:  # an empty retained message clears the topic
            continue
        if kind == "offer":
            try:
                offer = verify_offer(payload, now_ms, network)
                if offer["node_id"] != node:
                    raise OfferError("offer signed by a node, published as another", code="offer_topic_mismatch")
            except OfferError as e:
                refused[e.code] += 1
                offer_refused[node] = e.code
                continue
            if node not in offers or offer["seq"] > offers[node]["seq"]:
                offers[node] = offer
            offer_refused.pop(node, None)
            continue
        try:
            record = verify_record(kind, payload, node, now_ms)
        except RecordError as e:
            refused[e.code] += 1
            if kind == "totals":
                totals_refused[node] = e.code
            continue
        if kind == "state":
            states[node] = record
        else:
            if node not in totals or record["at"] >= totals[node]["at"]:
                totals[node] = record
            totals_refused.pop(node, None)
    return _summary(wanted, offers, states, totals, offer_refused, totals_refused, refused, len(strangers))


def _summary(wanted: set[str], offers: dict, states: dict, totals: dict, offer_refused: dict, totals_refused: dict,
             refused: Counter, strangers: int) -> dict[str, Any]:
    """The rows and sums from verified records (node -> record) and refusals (node -> code)."""
    seen = set(offers) | set(states) | set(totals) | set(offer_refused) | set(totals_refused)
    out = []
    for node_id in sorted(wanted or seen):
        row = _node(node_id)
        offer, state, total = offers.get(node_id), states.get(node_id), totals.get(node_id)
        if offer is not None:
            row.update({k: offer[k] for k in OFFER_SHOWN}, offer_verified=True)
        elif node_id in offer_refused:
            row["offer_refused"] = offer_refused[node_id]
        if total is not None:
            row.update({k: total[k] for k in (*SUMMED, "open_owed_sat")}, totals_verified=True,
                       totals_at=total["at"])
        elif node_id in totals_refused:
            row["totals_refused"] = totals_refused[node_id]
        stamps = [t for t in (offer and offer["issued_at"], total and total["at"],
                              state and state["state"] == "online" and state["at"]) if t]
        row["last_seen"] = max(stamps) if stamps else None
        if state is None:
            pass  # unknown: no verified state
        elif state["state"] == "offline":
            row["status"], row["since"] = "offline", max(state["at"], row["last_seen"] or 0)
        elif offer is not None:
            row["status"], row["since"] = "online", state["at"]
        elif offer_refused.get(node_id) == "offer_stale":  # online once, silent since: its offer ran out
            row["status"], row["since"] = "offline", row["last_seen"]
        else:
            row["status"], row["since"] = "unverified", state["at"]  # its offer is missing or forged
        out.append(row)
    sums = {name: sum(r[name] for r in out if r["totals_verified"]) for name in SUMMED}
    fleet = {"nodes": len(out), "online": sum(1 for r in out if r["status"] == "online"),
             "totals_verified": sum(1 for r in out if r["totals_verified"]), **sums}
    return {"nodes": out, "fleet": fleet, "refused": dict(sorted(refused.items())), "strangers": strangers}


class FleetStore:
    """What a running router keeps for its fleet view: per node and kind the newest record that
    verified on arrival, parsed (a forged one, or an older offer or totals replayed, never evicts
    it: a forgery is only counted in `refused`; states go by arrival, as the broker retains them),
    or, while none has, the refusal code of the last one. Each signature is checked once, on
    arrival (a record equal to the one kept is not checked again); a summary only looks at the
    offers' expiry. At most `max_nodes` nodes (later ones are counted in `dropped` before any
    check, never kept). Fed from paho's thread, read from the ubus thread. `nodes` is called for
    the owner's list each time (a reload's `fleet_nodes` applies at once): other nodes' records are
    dropped on arrival, and those kept are filtered again when summarised."""

    def __init__(self, prefix: str, nodes=lambda: (), max_nodes: int = MAX_NODES, clock=None):
        self.prefix = prefix
        self.nodes = nodes
        self.max_nodes = max_nodes
        self._clock = clock or (lambda: int(time.time() * 1000))
        # node -> kind -> (payload's SHA256, the fields of the record a summary reads or None, code or "")
        self._records: dict[str, dict[str, tuple[bytes, dict | None, str]]] = {}
        self._lock = threading.Lock()
        self.dropped = 0
        self.refused: Counter = Counter()  # refusals that evicted nothing

    def topics(self) -> list[str]:
        """What to subscribe to: every node's records (the list may change on reload)."""
        return [f"{self.prefix}/v1/+/{kind}" for kind in KINDS]

    def _check(self, node: str, kind: str, payload: bytes) -> tuple[dict | None, str]:
        """(record, "") if it verifies now, else (None, code)."""
        try:
            if kind == "offer":
                offer = verify_offer(payload, self._clock())
                return (offer, "") if offer["node_id"] == node else (None, "offer_topic_mismatch")
            return verify_record(kind, payload, node, self._clock()), ""
        except (OfferError, RecordError) as e:
            return None, e.code

    def keep(self, topic: str, payload: bytes) -> None:
        where = split_topic(topic, self.prefix)
        wanted = self.nodes()
        if where is None or where[1] not in KINDS or (wanted and where[0] not in wanted) or not payload:
            return
        node, kind = where
        with self._lock:
            records = self._records.get(node)
            if records is None and (len(self._records) >= self.max_nodes or not is_node_id(node)):
                self.dropped += 1
                return
            old = (records or {}).get(kind)
            digest = hashlib.sha256(payload).digest()
            if old is not None and old[0] == digest:
                return  # sent again (a reconnect): checked already
        record, code = self._check(node, kind, payload)  # outside the lock: a signature check takes ms
        if record is not None:
            record = {k: record[k] for k in KEPT[kind]}  # what a summary reads: less to keep
        order = "seq" if kind == "offer" else "at"
        with self._lock:
            records = self._records.setdefault(node, {})
            old = records.get(kind)
            if old is not None and old[1] is not None:
                if record is None:
                    self.refused[code] += 1  # a forgery evicts nothing
                    return
                if kind != "state" and record[order] < old[1][order]:
                    return  # an older record replayed
            records[kind] = (digest if record is not None else b"", record, code)

    def kept(self) -> dict[str, dict[str, str]]:
        """node -> kind -> "" (verified) or its refusal code: what is kept."""
        with self._lock:
            return {node: {kind: code for kind, (_, _, code) in records.items()}
                    for node, records in self._records.items()}

    def summary(self, now_ms: int) -> dict[str, Any]:
        wanted = set(self.nodes())
        offers, states, totals, offer_refused, totals_refused = {}, {}, {}, {}, {}
        with self._lock:
            refused = Counter(self.refused)
            items = [(n, dict(r)) for n, r in self._records.items() if not wanted or n in wanted]
        for node, records in items:
            for kind, (_, record, code) in records.items():
                if kind == "offer" and record is not None and record["valid_until"] <= now_ms:
                    record, code = None, "offer_stale"  # verified once, expired since
                if record is None:
                    refused[code] += 1
                    if kind != "state":
                        (offer_refused if kind == "offer" else totals_refused)[node] = code
                    continue
                {"offer": offers, "state": states, "totals": totals}[kind][node] = record
        out = _summary(wanted, offers, states, totals, offer_refused, totals_refused, refused, 0)
        out["dropped_nodes"] = self.dropped
        return out


def fleet_table(summary: dict[str, Any]) -> str:
    """The summary as a text table, fleet totals last (`bitmesh fleet`)."""
    def cell(value) -> str:
        return "-" if value is None else str(value)

    rows = [("NODE", "STATUS", "SINCE", "SAT/MB", "SAT/MIN", "CLIENTS", "TOTAL", "EARNED", "SETTLED", "SETTLING",
             "PAYMENTS", "TOTALS")]
    for n in summary["nodes"]:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(n["since"] / 1000)) if n["since"] else "-"
        rows.append((n["node_id"], n["status"], since, cell(n["sat_per_mb"]), cell(n["sat_per_minute"]),
                     cell(n["clients_now"]), cell(n["clients_total"]), cell(n["earned_sat"]), cell(n["settled_sat"]),
                     cell(n["settling_sat"]), cell(n["payments"]),
                     "signed" if n["totals_verified"] else f"REFUSED {n['totals_refused']}" if n["totals_refused"]
                     else "-"))
    f = summary["fleet"]
    rows.append((f"FLEET {f['nodes']}", f"{f['online']} online", "", "", "", cell(f["clients_now"]),
                 cell(f["clients_total"]), cell(f["earned_sat"]), cell(f["settled_sat"]), cell(f["settling_sat"]),
                 cell(f["payments"]), f"{f['totals_verified']} signed"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
