"""`bitmesh offers --broker URL`: the live offers of a marketplace, verified, cheapest first
(and `bitmesh fleet --broker URL`: the same collection, summarised by bitmesh.market.fleet).

It subscribes to `<prefix>/v1/+/offer` and `<prefix>/v1/+/state`, collects what the broker holds
(retained) and what comes within `--window` seconds, and keeps for each node its newest offer
(highest seq) that verifies (offer.verify_offer) and was published under that node's own topic.
Stale, forged and malformed offers are dropped and counted on stderr by refusal code. Order:
effective price (offer.effective_msat_per_mb: the MB price plus the minute price at 10 MB a
minute), then node_id. paho is imported only when the command runs (bus.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from bitmesh.errors import ConfigError
from bitmesh.market.offer import OfferError, effective_msat_per_mb, verify_offer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def parse_broker(url: str) -> tuple[str, int, bool]:
    """mqtt://host:port, mqtts://host:port (TLS) or host:port -> (host, port, tls)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"--broker: expected mqtt://host:port or mqtts://host:port, got {url!r}")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise ConfigError(f"--broker: invalid port in {url!r}") from None
    return parts.hostname, port, parts.scheme == "mqtts"


def select(messages: list[tuple[str, bytes]], prefix: str, now_ms: int,
           network: str | None = None) -> tuple[list[dict[str, Any]], Counter]:
    """Pure: the verified newest offer per node (with its `state`), and the refusals counted."""
    dropped: Counter = Counter()
    offers: dict[str, dict] = {}
    states: dict[str, str] = {}
    head = prefix.split("/")
    for topic, payload in messages:
        levels = topic.split("/")
        if levels[:-2] != [*head, "v1"] or len(levels) != len(head) + 3:
            continue
        node, kind = levels[-2], levels[-1]
        if kind == "state":
            try:
                states[node] = str(json.loads(payload)["state"])
            except (ValueError, KeyError, TypeError):
                pass
            continue
        if kind != "offer" or not payload:  # an empty retained message clears a topic
            continue
        try:
            offer = verify_offer(payload, now_ms, network)
        except OfferError as e:
            dropped[e.code] += 1
            continue
        if offer["node_id"] != node:
            dropped["offer_topic_mismatch"] += 1  # signed by a node, published as another
            continue
        if node not in offers or offer["seq"] > offers[node]["seq"]:
            offers[node] = offer
    out = [{**o, "state": states.get(n, "unknown"), "effective_msat_per_mb": effective_msat_per_mb(o)}
           for n, o in offers.items()]
    out.sort(key=lambda o: (o["effective_msat_per_mb"], o["node_id"]))
    return out, dropped


def table(offers: list[dict[str, Any]]) -> str:
    rows = [("NODE", "SAT/MB", "SAT/MIN", "EFF SAT/MB", "LOAD", "STATE", "NETWORK", "SSID", "PORTAL")]
    rows += [(o["node_id"], str(o["sat_per_mb"]), str(o["sat_per_minute"]), f"{o['effective_msat_per_mb'] / 1000:.3f}",
              f"{o['load']}/{o['capacity']}", o["state"], o["network"], o["ssid"] or "-", o["portal_url"] or "-")
             for o in offers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def collect(args: argparse.Namespace, topics: list[str]) -> list[tuple[str, bytes]] | None:
    """What the broker holds (retained) and what comes within `--window` s on `topics`, oldest
    first; None (said on stderr) when the broker is not reached."""
    from bitmesh.market.bus import BrokerConfig, Subscription

    host, port, tls = parse_broker(args.broker)
    password = Path(args.password_file).read_text().strip() if args.password_file else ""
    config = BrokerConfig(host, port, username=args.username or "", password=password, tls=tls or bool(args.ca_file),
                          ca_file=args.ca_file or "")
    try:
        sub = Subscription(config, topics).start(timeout=args.timeout)
    except ConnectionError as e:
        print(f"bitmesh: broker_unreachable: {e}", file=sys.stderr)
        return None
    time.sleep(args.window)
    sub.stop()
    return [(t, p) for t, p, _, _ in sub.messages]


def run(args: argparse.Namespace) -> int:
    messages = collect(args, [f"{args.prefix}/v1/+/offer", f"{args.prefix}/v1/+/state"])
    if messages is None:
        return 2
    offers, dropped = select(messages, args.prefix, int(time.time() * 1000), args.network)
    if dropped:
        print(f"dropped {sum(dropped.values())} offer(s): "
              + ", ".join(f"{code} {n}" for code, n in sorted(dropped.items())), file=sys.stderr)
    print(json.dumps(offers, indent=2) if args.json else table(offers))
    return 0


def run_fleet(args: argparse.Namespace) -> int:
    """`bitmesh fleet`: the owner's routers from their signed totals, state and offers."""
    from bitmesh.market.fleet import KINDS, fleet_table, is_node_id, summarise

    nodes = tuple(dict.fromkeys(n.lower() for n in args.node or ()))
    bad = [n for n in nodes if not is_node_id(n)]
    if bad:
        raise ConfigError(f"--node: expected a node id (16 hex digits), got {bad[0]!r}")
    messages = collect(args, [f"{args.prefix}/v1/+/{kind}" for kind in KINDS])
    if messages is None:
        return 2
    summary = summarise(messages, args.prefix, int(time.time() * 1000), nodes, args.network)
    if summary["refused"]:
        print(f"refused {sum(summary['refused'].values())} record(s) (not counted): "
              + ", ".join(f"{code} {n}" for code, n in summary["refused"].items()), file=sys.stderr)
    print(json.dumps(summary, indent=2) if args.json else fleet_table(summary))
    return 0


def _broker_options(p, what: str) -> None:
    p.add_argument("--broker", required=True, help="mqtt://host:port, or mqtts://host:port for TLS")
    p.add_argument("--prefix", default="bitmesh", help="topic prefix (the routers' mqtt_topic_prefix)")
    p.add_argument("--network", help=f"only {what} of this network (main, test, regtest ...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--window", type=float, default=1.0, help=f"seconds to collect {what} after subscribing")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password-file", help="file holding the broker password (never on the command line)")
    p.add_argument("--ca-file", help="CA certificate (PEM) of a TLS broker; implies TLS")


def add_fleet_parser(sub) -> None:
    p = sub.add_parser("fleet", help="the owner's routers on a broker (MQTT): state, prices, clients, earnings")
    _broker_options(p, "records")
    p.add_argument("--node", action="append", help="a node id of the fleet, repeatable (default: every node)")
    p.set_defaults(func=run_fleet)


def add_parser(sub) -> None:
    p = sub.add_parser("offers", help="list the live offers of a marketplace (MQTT), cheapest first")
    _broker_options(p, "offers")
    p.set_defaults(func=run)
