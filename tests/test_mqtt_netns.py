"""The marketplace over a real mosquitto (tests/support/mosquitto.py) with the real `bitmesh serve`
in a router namespace (it reaches the broker through a TCP bridge to this process's loopback):
the retained signed offer, `bitmesh offers` dropping forged and stale ones, a reload's new price
advertised, the last will on SIGKILL, events and totals across a broker restart while a real
`bitmesh pay` pays, no client secret in any payload, TLS and username/password.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bitmesh.channel.keys import ChannelKeychain
from bitmesh.market.bus import BrokerConfig, Subscription
from bitmesh.market.identity import node_key
from bitmesh.market.offer import OFFER_TTL_MS, Terms, encode, make_offer, offer_digest, verify_offer
from bitmesh.market.publisher import now_ms
from tests.support.coins import NETWORK
from tests.support.mosquitto import Mosquitto, available
from tests.support.netns import Topology
from tests.support.router import REPO, RouterService, payers, portal_call, router_services, uci_config

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
    pytest.mark.skipif(not available(), reason="needs mosquitto and openssl (tools/deps.sh)"),
]


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=1) as t:
        t.bridge_tcp(t.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        yield t


@pytest.fixture
def broker(topo, tmp_path):
    """`broker(**Mosquitto options)`: a started mosquitto the router namespace reaches at the
    same 127.0.0.1 port; stopped at the end."""
    started: list[Mosquitto] = []

    def start(**kw) -> Mosquitto:
        m = Mosquitto(tmp_path / f"mosquitto{len(started)}", **kw).start()
        started.append(m)
        topo.bridge_tcp(topo.router.ns, m.port, ("127.0.0.1", m.port))
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def router(topo, bcoin, tmp_path):
    with router_services(topo) as started:
        def start(**options) -> RouterService:
            service = RouterService(topo, bcoin, tmp_path / "router", options).start()
            started.append(service)
            return service

        yield start


def subscribe(m: Mosquitto, topics=("bitmesh/#",), **kw) -> Subscription:
    config = BrokerConfig("127.0.0.1", m.port, client_id=kw.pop("client_id", ""), username=kw.pop("username", ""),
                          password=kw.pop("password", ""), tls=m.tls, ca_file=str(m.ca or ""))
    return Subscription(config, list(topics), **kw).start()


def wait_offer(sub: Subscription, match=lambda o: True, timeout: float = 15.0) -> dict:
    def ok(topic: str, payload: bytes) -> bool:
        if not topic.endswith("/offer"):
            return False
        offer = json.loads(payload)
        return match(offer)

    msg = sub.wait_for(ok, timeout)
    assert msg is not None, f"no offer arrived; got {[t for t, *_ in sub.messages]}"
    return verify_offer(msg[1], now_ms(), network=NETWORK)


def mqtt_options(m: Mosquitto, **more) -> dict:
    return {"mqtt_enabled": 1, "mqtt_broker": m.broker, **more}


def offers_cli(m: Mosquitto, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitmesh.cli", "offers", "--broker", f"mqtt://127.0.0.1:{m.port}",
                           "--window", "1", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_offer_is_retained_signed_and_forged_or_stale_ones_are_dropped(topo, router, broker, tmp_path):
    m = broker()
    service = router(**mqtt_options(m), price_sat_per_mb=1234, price_sat_per_minute=7)
    portal_offer = portal_call(topo.clients[0].ns, service.url, "offer")
    # a subscriber that comes after the publication gets the offer: it is retained
    time.sleep(0.5)
    sub = subscribe(m)
    offer = wait_offer(sub)
    assert next(r for t, _, r, _ in sub.messages if t.endswith("/offer")), "the offer is retained"
    assert offer["node_id"] == portal_offer["node_id"]  # the id the portal always gave, bound to the key
    assert (offer["sat_per_mb"], offer["sat_per_minute"], offer["network"]) == (1234, 7, NETWORK)
    assert (offer["prepay_step_sat"], offer["min_deposit_sat"], offer["load"]) == (500, 2000, 0)
    assert offer["portal_url"] == f"http://{topo.router.ipv4}:{service.port}/"
    assert offer["fee_policy"] == portal_offer["fee_policy"]
    node = offer["node_id"]
    state = sub.wait_for(lambda t, p: t == f"bitmesh/v1/{node}/state", 5)
    assert state and json.loads(state[1])["state"] == "online"
    totals = sub.wait_for(lambda t, p: t == f"bitmesh/v1/{node}/totals", 5)
    assert totals and json.loads(totals[1])["clients_now"] == 0

    # forgeries next to it, each under a topic of its own (so the real retained offer stays)
    forger = node_key(ChannelKeychain(secrets.token_bytes(32)))
    terms = Terms(**{k: offer[k] for k in Terms.__dataclass_fields__})
    own = make_offer(forger, terms, now_ms(), now_ms())
    body = {k: v for k, v in own.items() if k != "sig"}
    claims_victim = {**body, "node_id": node}
    forged = {
        "tampered": encode({**offer, "sat_per_mb": 1}),
        "claims_victim": encode({**claims_victim, "sig": forger.sign(offer_digest(claims_victim)).hex()}),
        node[:-1] + "0" if node[-1] != "0" else node[:-1] + "1": encode(own),  # a valid offer under another's id
        "stale": encode(make_offer(forger, terms, 1, now_ms() - OFFER_TTL_MS - 1)),
    }
    publisher = subscribe(m, topics=["unused/#"])
    for topic, payload in forged.items():
        publisher._client.publish(f"bitmesh/v1/{topic}/offer", payload, qos=1, retain=True).wait_for_publish()
    publisher.stop()
    p = offers_cli(m, "--network", NETWORK, "--json")
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    assert [o["node_id"] for o in listed] == [node] and listed[0]["state"] == "online"
    assert re.search(r"dropped 4 offer\(s\): offer_node_id_mismatch 1, offer_signature_invalid 1, "
                     r"offer_stale 1, offer_topic_mismatch 1", p.stderr), p.stderr
    table = offers_cli(m)
    assert table.returncode == 0 and node in table.stdout and "SAT/MB" in table.stdout, table.stderr
    assert offers_cli(m, "--network", "main", "--json").stdout.strip() == "[]"

    # a reload with a new price: the new signed offer, with a higher seq
    service.config.write_text(service.config.read_text().replace("'1234'", "'2345'"))
    os.kill(service.proc.pid, signal.SIGHUP)
    new = wait_offer(sub, lambda o: o["sat_per_mb"] == 2345)
    assert new["seq"] > offer["seq"] and new["node_id"] == node
    sub.stop()


def test_sigkill_leaves_the_last_will_offline_state(router, broker):
    m = broker()
    service = router(**mqtt_options(m))
    sub = subscribe(m)
    node = wait_offer(sub)["node_id"]
    assert sub.wait_for(lambda t, p: t.endswith("/state") and b'"online"' in p, 5)
    service.kill()
    # mosquitto publishes the will once it sees the connection gone (the socket closed with the process)
    will = sub.wait_for(lambda t, p: t == f"bitmesh/v1/{node}/state" and b'"offline"' in p, 15)
    assert will is not None
    sub.stop()
    late = subscribe(m)  # retained: a reader that comes later sees it offline too
    assert late.wait_for(lambda t, p: t.endswith("/state") and json.loads(p)["state"] == "offline", 5)
    late.stop()


def _secrets_of(service: RouterService, payer, node) -> list[str]:
    """What must never be published: the channel's proofs, the client key (secret and public),
    every payment signature, the funding transaction, the refund script, the client's MAC and IP."""
    record = json.loads(payer.channel_file.read_text())
    found = {payer.proof("session"), payer.proof("close"), record["client_secret"]}
    for path in (service.workdir / "state").glob("channels.*"):
        for line in path.read_text().splitlines():
            rec = json.loads(line.split(" ", 1)[1])
            chan = rec.get("c") or {}
            found |= {rec.get("sig") or "", chan.get("payment_sig") or "", chan.get("client_pubkey") or "",
                      chan.get("refund_script") or "", chan.get("client_mac") or "", chan.get("client_ip") or ""}
            if chan.get("funding"):
                found.add(node.rpc("getrawtransaction", chan["funding"].split(":")[0]))
    found |= {(payer.client.mac or "").replace(":", ""), payer.client.ipv4}
    return sorted(s.lower() for s in found if s and len(s) >= 8)


def test_events_survive_a_broker_restart_and_carry_no_client_secret(topo, bcoin, faucet, router, broker, tmp_path):
    m = broker(persistence=True)  # keeps the persistent subscriber's session across the restart
    service = router(**mqtt_options(m), price_sat_per_mb=0, price_sat_per_minute=12_000, prepay_step_sat=400)
    sub = subscribe(m, client_id="fleet-watch", persistent=True)
    node = wait_offer(sub)["node_id"]
    with payers(topo, faucet, tmp_path) as pay:
        payer = pay(service, 20_000, interval=0.2)
        payer.wait_for(r"^paid \d+ sat", timeout=60)
        first = len(payer.lines)
        payer.wait_for(r"^paid \d+ sat", timeout=30, after=first)
        m.stop()
        down_at = time.time()
        payer.wait_for(r"^paid \d+ sat", timeout=30, after=len(payer.lines))  # a payment during the outage
        m.start()
        up_at, up_mono = time.time(), time.monotonic()
        payer.wait_for(r"^paid \d+ sat", timeout=30, after=len(payer.lines))  # and one after it
        during = [int(x) for t, line in payer.lines if down_at < t < up_at and (x := _paid(line))]
        assert during, "no payment while the broker was down"
        closed = payer.close()
        assert closed["settlement_txid"], closed
        payer.kill()
        paid = [x for _, line in payer.lines if (x := _paid(line))]
        events_topic = f"bitmesh/v1/{node}/events"
        assert sub.wait_for(lambda t, p: t == events_topic and json.loads(p)["type"] == "settlement", 30)
        final_paid = closed["paid"]
        assert sub.wait_for(lambda t, p: t.endswith("/totals") and json.loads(p)["payments"] >= len(paid), 15)
        events = [json.loads(p) for t, p, _, _ in sub.messages if t == events_topic]
        secrets_ = _secrets_of(service, payer, bcoin)
    # every acknowledged payment was announced, those of the outage included, in order; QoS 1 is
    # at least once (a message in flight when the broker went may come twice): readers dedupe
    announced = list(dict.fromkeys(e["paid_sat"] for e in events if e["type"] == "payment"))
    assert set(paid) <= set(announced) and announced == sorted(announced), (paid, announced)
    assert set(during) <= set(announced)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "session_start" and "session_stop" in kinds and kinds[-1] == "settlement"
    settlement = events[-1]
    assert settlement["txid"] == closed["settlement_txid"] and 0 < settlement["owner_sat"] <= final_paid
    # the current values went out again after the restart (the broker kept them too, but they came anew)
    assert any(t.endswith("/offer") and at > up_mono for t, _, _, at in sub.messages)
    totals = json.loads(next(p for t, p, _, _ in reversed(sub.messages) if t.endswith("/totals")))
    assert totals["payments"] == len(announced) and totals["clients_total"] >= 1
    # no payload carries a client secret
    everything = "\n".join(p.decode().lower() for _, p, _, _ in sub.messages)
    assert len(secrets_) >= 8
    leaked = [s for s in secrets_ if s in everything]
    assert not leaked, leaked
    sub.stop()


def _paid(line: str) -> int | None:
    m = re.match(r"paid (\d+) sat", line)
    return int(m.group(1)) if m else None


def test_tls_and_password_connect_and_a_wrong_password_never_stops_the_gate(topo, router, broker, tmp_path):
    m = broker(tls=True, users={"router": "s3cret-pass", "reader": "r3ad"})
    service = router(**mqtt_options(m, mqtt_tls=1, mqtt_ca_file=str(m.ca), mqtt_username="router",
                                    mqtt_password="s3cret-pass"))
    sub = subscribe(m, username="reader", password="r3ad")
    offer = wait_offer(sub)
    assert offer["node_id"]
    sub.stop()
    # the password is in no log line
    assert "s3cret-pass" not in service.log.read_text()
    # a wrong password: the broker refuses it, the hotspot serves on
    service.stop()
    service.config.write_text(service.config.read_text().replace("s3cret-pass", "wrong-pass"))
    service.start()
    assert portal_call(topo.clients[0].ns, service.url, "offer")["node_id"] == offer["node_id"]
    time.sleep(2)
    log = service.log.read_text()
    assert "refused the connection" in log and "wrong-pass" not in log


def test_mqtt_settings_apply_on_reload(topo, router, broker):
    """MQTT off at start, switched on by a reload (SIGHUP): the offer comes; off again: offline."""
    m = broker()
    service = router()
    sub = subscribe(m)
    assert sub.wait_for(lambda t, p: True, 1) is None
    text = service.config.read_text()
    service.config.write_text(text + uci_config(mqtt_options(m)).split("\n", 1)[1])
    os.kill(service.proc.pid, signal.SIGHUP)
    node = wait_offer(sub)["node_id"]
    service.config.write_text(text)
    os.kill(service.proc.pid, signal.SIGHUP)
    assert sub.wait_for(lambda t, p: t == f"bitmesh/v1/{node}/state" and b'"offline"' in p, 10)
    sub.stop()
