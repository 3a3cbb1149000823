"""Marketplace bench figures (issue 11: offers and events over MQTT; a real mosquitto here).

mqtt.events_per_s
    Events the service's bus (bitmesh.market.bus.Bus, as the service builds it: QoS 1, its
    queue of EVENT_QUEUE events) gets delivered through the broker to a subscriber, per second:
    a burst of EVENT_QUEUE events per round, from the first put to the last one received; median
    of ROUNDS rounds, `mqtt.events_per_s_min`/`_max` the spread. Target at least 1,000.
mqtt.offer_propagation_ms
    A price change to a subscriber holding the new signed offer: the real `bitmesh serve`
    (--no-firewall, a bcoin regtest node as its chain) gets SIGHUP after its config got a new
    price; measured from the signal to the arrival of the offer with that price (verified).
    Median of ROUNDS reloads, `_min`/`_max` the spread. Target at most 50.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bitmesh.market.bus import EVENT_QUEUE, BrokerConfig, Bus, Subscription
from bitmesh.market.offer import verify_offer
from tests.support.bcoin import free_port
from tests.support.coins import NETWORK, key_address, new_key
from tests.support.mosquitto import Mosquitto, available
from tests.support.router import REPO, ROUTER_OPTIONS, regtest, uci_config

ROUNDS = 9


def _spread(key: str, values: list[float], digits: int = 1) -> dict:
    return {key: round(statistics.median(values), digits), f"{key}_min": round(min(values), digits),
            f"{key}_max": round(max(values), digits)}


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _events_round(bus: Bus, sub: Subscription, n: int, tag: str) -> float:
    start = time.monotonic()
    for i in range(n):
        bus.put_event("bench/v1/node/events", b'{"type":"payment","tag":"%s","i":%d}' % (tag.encode(), i))
    last = b'"tag":"%s","i":%d}' % (tag.encode(), n - 1)
    got = sub.wait_for(lambda t, p: p.endswith(last), 30)
    if got is None:
        raise RuntimeError(f"round {tag}: the last event never arrived")
    return n / (got[3] - start)


def events_per_s(m: Mosquitto) -> dict:
    config = BrokerConfig("127.0.0.1", m.port, client_id="bench-node")
    bus = Bus(config).start()
    sub = Subscription(BrokerConfig("127.0.0.1", m.port), ["bench/v1/+/events"]).start()
    try:
        deadline = time.monotonic() + 10
        while not bus.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        _events_round(bus, sub, 100, "warm")
        rates = [_events_round(bus, sub, EVENT_QUEUE, f"r{i}") for i in range(ROUNDS)]
        if bus.dropped:
            raise RuntimeError(f"{bus.dropped} events dropped")
    finally:
        sub.stop()
        bus.stop()
    return _spread("mqtt.events_per_s", rates, 0)


def offer_propagation_ms(m: Mosquitto, workdir: Path) -> dict:
    with regtest(workdir / "bcoin") as (node, _faucet):
        config = workdir / "config" / "bitmesh"
        config.parent.mkdir(parents=True)
        options = {**ROUTER_OPTIONS, "chain_backend": "core", "core_rpc_url": f"http://127.0.0.1:{node.rpc_port}/",
                   "core_rpc_password": node.api_key, "payout_address": key_address(new_key()),
                   "state_dir": workdir / "state", "mqtt_enabled": 1, "mqtt_broker": m.broker}
        config.write_text(uci_config(options))
        port = free_port()
        log = (workdir / "service.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "bitmesh.cli", "serve", "--config", str(config), "--no-firewall",
                                 "--no-ubus", "--listen", f"127.0.0.1:{port}"], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        sub = Subscription(BrokerConfig("127.0.0.1", m.port), ["bitmesh/v1/+/offer"]).start()
        try:
            if sub.wait_for(lambda t, p: True, 30) is None:
                raise RuntimeError(f"no offer from the service: {(workdir / 'service.log').read_text()[-2000:]}")
            _wait_http(f"http://127.0.0.1:{port}/api/offer")  # started: SIGHUP is handled from here on
            times = []
            for i in range(ROUNDS + 1):
                price = 2000 + i
                options["price_sat_per_mb"] = price
                config.write_text(uci_config(options))
                sent = time.monotonic()
                os.kill(proc.pid, signal.SIGHUP)
                got = sub.wait_for(lambda t, p, price=price: json.loads(p)["sat_per_mb"] == price, 10)
                if got is None:
                    raise RuntimeError(f"no offer at {price} sat/MB: {(workdir / 'service.log').read_text()[-3000:]}")
                verify_offer(got[1], int(time.time() * 1000), network=NETWORK)
                if i:  # the first reload warms the reload path up
                    times.append((got[3] - sent) * 1000)
                time.sleep(0.2)
        finally:
            sub.stop()
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            log.close()
    return _spread("mqtt.offer_propagation_ms", times, 1)


def run() -> dict:
    if not available():
        return {"mqtt.skipped": "needs mosquitto and openssl (tools/deps.sh)"}
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        workdir = Path(tmp)
        m = Mosquitto(workdir / "mosquitto").start()
        try:
            return {**events_per_s(m), **offer_propagation_ms(m, workdir)}
        finally:
            m.stop()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
