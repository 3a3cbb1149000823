"""The fleet view for real: two real `bitmesh serve` routers (one in the router namespace, one in
the upstream namespace, each with its own firewall) publishing to one real mosquitto, a real
`bitmesh pay` paying on the first. `bitmesh fleet --json` shows both, the paying one's earnings
equal to its own ubus `earnings`; a stranger on the broker is left out by `--node` / `fleet_nodes`;
forged totals (another key claiming a node's id, a tampered copy of a real one) are refused and
change no sum; a SIGKILLed router shows offline; the ubus `fleet` method through OpenWrt's real
ubusd (RouterService(with_ubus=True)) answers the same summary, and `mqtt_disabled` once MQTT is off.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bitmesh.channel.keys import ChannelKeychain
from bitmesh.market import events
from bitmesh.market.bus import BrokerConfig, Subscription
from bitmesh.market.identity import node_id_of, node_key
from bitmesh.market.offer import encode
from tests.support.mosquitto import Mosquitto, available
from tests.support.netns import Topology
from tests.support.owrt import wait_for
from tests.support.router import REPO, RouterService, payers, router_services

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
    pytest.mark.skipif(not available(), reason="needs mosquitto and openssl (tools/deps.sh)"),
]

PRICE_A, PRICE_B = 0, 7  # sat per MB (A sells time: its payments do not wait for traffic)
PER_MINUTE_A = 60_000
COMPARED = ("node_id", "status", "offer_verified", "sat_per_mb", "sat_per_minute", "totals_verified",
            "totals_refused", "earned_sat", "settled_sat", "settling_sat", "open_paid_sat", "clients_now",
            "clients_total", "payments")


@pytest.fixture(scope="module")
def topo(bcoin):
    with Topology(n_clients=1) as t:
        for ns in (t.router.ns, t.upstream.ns):
            t.bridge_tcp(ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        yield t


def _seeded(workdir, seed: bytes) -> str:
    """Write the router's node seed before it starts; its node_id."""
    state = workdir / "state"
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / "seed", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(seed.hex() + "\n")
    return node_id_of(bytes(node_key(ChannelKeychain(seed)).pub))


def fleet_cli(m: Mosquitto, *args: str, as_json: bool = True):
    p = subprocess.run([sys.executable, "-m", "bitmesh.cli", "fleet", "--broker", f"mqtt://127.0.0.1:{m.port}",
                        "--window", "1", *(["--json"] if as_json else []), *args], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout) if as_json else p.stdout


def rows(summary: dict) -> dict[str, dict]:
    return {r["node_id"]: {k: r[k] for k in COMPARED} for r in summary["nodes"]}


def wait(what: str, check, timeout: float = 30.0):
    return wait_for(check, timeout, what, 0.5)


def publish(m: Mosquitto, topic: str, payload: bytes, retain: bool) -> None:
    client = Subscription(BrokerConfig("127.0.0.1", m.port), ["unused/#"]).start()
    client._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish()
    client.stop()


@pytest.mark.owrt  # the ubus part: OpenWrt's ubusd (tests/support/owrt.py)
def test_two_routers_one_view(topo, bcoin, faucet, tmp_path):
    m = Mosquitto(tmp_path / "mosquitto").start()
    try:
        for ns in (topo.router.ns, topo.upstream.ns):
            topo.bridge_tcp(ns, m.port, ("127.0.0.1", m.port))
        mqtt = {"mqtt_enabled": 1, "mqtt_broker": m.broker}
        a_id = _seeded(tmp_path / "a", os.urandom(32))
        b_id = _seeded(tmp_path / "b", os.urandom(32))
        with router_services(topo) as started, payers(topo, faucet, tmp_path) as pay:
            a = RouterService(topo, bcoin, tmp_path / "a", {**mqtt, "price_sat_per_mb": PRICE_A,
                                                            "price_sat_per_minute": PER_MINUTE_A,
                                                            "prepay_step_sat": 1_000},
                              with_ubus=True)
            a.config.write_text(a.config.read_text() + f"\tlist fleet_nodes '{a_id}'\n\tlist fleet_nodes '{b_id}'\n")
            started.append(a.start())
            b = RouterService(topo, bcoin, tmp_path / "b", {**mqtt, "interface": topo.upstream.ifname,
                                                            "price_sat_per_mb": PRICE_B}, host=topo.upstream)
            started.append(b.start())
            # a stranger on the same broker, with validly signed records of its own
            stranger = node_key(ChannelKeychain(secrets.token_bytes(32)))
            s_id = node_id_of(bytes(stranger.pub))
            earnings = {"settled_sat": 777, "settling_sat": 0, "open_paid_sat": 0, "open_owed_sat": 0,
                        "settled_channels": 1, "settling_channels": 0, "open_channels": 0}
            now = int(time.time() * 1000)
            signed = events.sign(stranger, "totals", events.totals_payload(s_id, earnings, 0, 1, now, now))
            publish(m, f"bitmesh/v1/{s_id}/totals", encode(signed), True)

            payer = pay(a, 20_000, interval=0.2)
            payer.wait_for(r"^paid \d+ sat", timeout=60)
            for _ in range(3):  # enough used that settling is worth its fee
                payer.wait_for(r"^paid \d+ sat", timeout=30, after=len(payer.lines))
            closed = payer.close()
            assert closed["settlement_txid"], closed
            payer.kill()
            own = a.ubus_call("earnings")
            earned = own["settled_sat"] + own["settling_sat"]
            assert earned > 0

            # the CLI: both nodes, A's earnings its own ubus earnings, the stranger left out
            seen: list[dict] = []

            def settled_view():
                s = fleet_cli(m, "--node", a_id, "--node", b_id)
                seen[:] = [s]
                r = {n["node_id"]: n for n in s["nodes"]}
                return s if r[a_id]["earned_sat"] == earned and r[a_id]["clients_now"] == 0 else None

            try:
                cli = wait("A's settlement in the fleet view", settled_view)
            except AssertionError:
                raise AssertionError(f"earned {earned}, fleet view {seen}") from None
            ra, rb = rows(cli)[a_id], rows(cli)[b_id]
            assert set(rows(cli)) == {a_id, b_id} and cli["strangers"] == 1
            assert (ra["status"], ra["offer_verified"], ra["totals_verified"]) == ("online", True, True)
            assert (ra["sat_per_mb"], ra["sat_per_minute"], rb["sat_per_mb"]) == (PRICE_A, PER_MINUTE_A, PRICE_B)
            assert (ra["settled_sat"], ra["settling_sat"], ra["open_paid_sat"]) == (
                own["settled_sat"], own["settling_sat"], own["open_paid_sat"])
            assert ra["clients_total"] == own["settled_channels"] + own["settling_channels"] + own["open_channels"] == 1
            assert ra["payments"] >= 2
            assert (rb["status"], rb["earned_sat"], rb["clients_total"]) == ("online", 0, 0) and rb["totals_verified"]
            assert cli["fleet"]["earned_sat"] == earned
            assert (cli["fleet"]["nodes"], cli["fleet"]["online"], cli["fleet"]["payments"]) == (2, 2, ra["payments"])
            everyone = fleet_cli(m)  # no --node: every node on the broker, the stranger too
            assert everyone["fleet"]["earned_sat"] == earned + 777 and s_id in rows(everyone)
            table = fleet_cli(m, "--node", a_id, "--node", b_id, as_json=False).splitlines()
            assert table[0].split()[:3] == ["NODE", "STATUS", "SINCE"] and len(table) == 4
            assert table[-1].startswith("FLEET 2") and str(earned) in table[-1].split()

            # ubus `fleet` on A (fleet_nodes: A and B) through the real ubusd: the same summary
            view = wait("the ubus fleet view", lambda: (v := a.ubus_call("fleet")) and rows(v) == rows(cli) and v)
            assert view["fleet"] == cli["fleet"] and view["node_id"] == a_id
            assert view["strangers"] == 0 and view["dropped_nodes"] == 0  # the stranger: dropped on arrival, not kept

            # forgeries: another key claiming B's id (retained: it replaces B's real totals on the
            # broker), and a tampered copy of A's real totals (live)
            forger = node_key(ChannelKeychain(secrets.token_bytes(32)))
            claim = events.totals_payload(b_id, {**earnings, "settled_sat": 10**6}, 0, 1, now, int(time.time() * 1000))
            publish(m, f"bitmesh/v1/{b_id}/totals", encode(events.sign(forger, "totals", claim)), True)
            real_a = json.loads(next(p for t, p in _retained(m, f"bitmesh/v1/{a_id}/totals")))
            publish(m, f"bitmesh/v1/{a_id}/totals",
                    encode({**real_a, "settled_sat": real_a["settled_sat"] + 50_000,
                            "earned_sat": real_a["earned_sat"] + 50_000}), False)
            cli = fleet_cli(m, "--node", a_id, "--node", b_id)
            assert cli["fleet"]["earned_sat"] == earned and cli["refused"] == {"record_node_id_mismatch": 1}
            assert rows(cli)[b_id]["totals_refused"] == "record_node_id_mismatch"
            assert rows(cli)[b_id]["earned_sat"] is None and cli["fleet"]["totals_verified"] == 1
            view = wait("both forgeries refused by A's store",
                        lambda: (v := a.ubus_call("fleet"))["refused"] == {"record_node_id_mismatch": 1,
                                                                          "record_signature_invalid": 1} and v)
            # the router kept the verified totals it had: a forgery evicts nothing there
            assert view["fleet"]["earned_sat"] == earned and view["fleet"]["totals_verified"] == 2
            assert rows(view)[b_id]["totals_verified"] and rows(view)[b_id]["earned_sat"] == 0

            # B dies without a word: its last will says offline, in both views
            b.kill()
            cli = wait("B offline", lambda: (s := fleet_cli(m, "--node", a_id, "--node", b_id))
                       and rows(s)[b_id]["status"] == "offline" and s)
            assert rows(cli)[a_id]["status"] == "online" and cli["fleet"]["online"] == 1
            assert next(n for n in cli["nodes"] if n["node_id"] == b_id)["since"]
            view = wait("B offline over ubus", lambda: (v := a.ubus_call("fleet"))
                        and rows(v)[b_id]["status"] == "offline" and v)
            assert view["fleet"]["online"] == 1 and view["fleet"]["earned_sat"] == earned

            # MQTT switched off by a reload: the fleet view says why it has nothing
            a.config.write_text(a.config.read_text().replace("option mqtt_enabled '1'", "option mqtt_enabled '0'"))
            os.kill(a.proc.pid, signal.SIGHUP)
            off = wait("mqtt_disabled", lambda: (v := a.ubus_call("fleet")).get("error") and v)
            assert off["error"]["code"] == "mqtt_disabled"
    finally:
        m.stop()


def _retained(m: Mosquitto, topic: str) -> list[tuple[str, bytes]]:
    sub = Subscription(BrokerConfig("127.0.0.1", m.port), [topic]).start()
    got = sub.wait_for(lambda t, p: True, 5)
    sub.stop()
    assert got is not None, f"nothing retained on {topic}"
    return [(got[0], got[1])]
