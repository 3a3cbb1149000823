"""The service's ubus objects on OpenWrt's own ubusd, rpcd and uhttpd (built from source), with
the real python3-ubus binding: what the command line, scripts and LuCI actually get.

The service runs in this process (its ubus thread on the real libubus), against the session's
bcoin regtest node, with no firewall; the whole hotspot with ubus is
tests/test_hotspot_netns.py::test_owner_controls_the_hotspot_over_ubus.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitmesh.chain.address import p2wpkh_script
from bitmesh.channel import contract as c
from bitmesh.channel.payer import Coin as PayerCoin
from bitmesh.config import Settings
from bitmesh.firewall.nft import Nft
from bitmesh.firewall.ruleset import FirewallError
from bitmesh.paying import PayerSession
from bitmesh.portal.client import PortalClient
from bitmesh.service import Service, build_service
from tests.support.bcoin import free_port
from tests.support.coins import NETWORK, key_address, new_key
from tests.support.faults import StallingProxy
from tests.support.owrt import Login, OwrtRoot, UbusHttp, UbusHttpError, wait_for

pytestmark = [pytest.mark.owrt, pytest.mark.regtest]

REPO = Path(__file__).resolve().parents[1]
APP_ACL = REPO / "luci-app-bitmesh/root/usr/share/rpcd/acl.d/luci-app-bitmesh.json"
ADMIN = Login("admin", "admin-pw", read=("luci-base", "luci-app-bitmesh"), write=("luci-base", "luci-app-bitmesh"))
VIEWER = Login("viewer", "viewer-pw", read=("luci-base", "luci-app-bitmesh"), write=())


@pytest.fixture
def owrt(tmp_path):
    root = OwrtRoot(tmp_path / "owrt")
    root.stage("/usr/share/rpcd/acl.d/luci-app-bitmesh.json", APP_ACL.read_bytes())
    with root:
        root.start_ubusd()
        yield root


@pytest.fixture
def proxy(bcoin):
    p = StallingProxy(("127.0.0.1", bcoin.rpc_port))
    yield p
    p.close()


@pytest.fixture
def service(owrt, bcoin, proxy, tmp_path):
    """`service()` starts `bitmesh serve`'s Service in this process (its ubus thread on the
    root's ubusd), chain backend = the bcoin node behind `proxy`."""
    started: list[Service] = []

    def start() -> Service:
        settings = Settings.from_dict({
            "enabled": True, "network": NETWORK, "chain_backend": "core",
            "core_rpc_url": f"http://127.0.0.1:{proxy.port}/", "core_rpc_user": "x",
            "core_rpc_password": bcoin.api_key, "payout_address": key_address(new_key()),
            "state_dir": str(tmp_path / "state"), "price_sat_per_mb": 1000, "price_sat_per_minute": 0,
            "prepay_step_sat": 500, "min_deposit_sat": 2000, "zero_conf_max_sat": 1_000_000,
            "expiry_blocks": 40, "settle_margin_blocks": 5,
        })
        svc = build_service(settings, listen=[("127.0.0.1", free_port())], firewall=False, watch_interval=1,
                            ubus=True, ubus_socket=str(owrt.ubus_socket))
        svc.start()
        started.append(svc)
        wait_for(lambda: owrt.ubus("call", "bitmesh", "status", timeout=10).returncode == 0, 10, "bitmesh on ubus")
        return svc

    yield start
    for svc in started:
        svc.stop()
        svc.shutdown()


def ubus_call(root: OwrtRoot, obj: str, method: str, args: dict | None = None, timeout: int = 30):
    """(ubus status, reply) of `ubus -t TIMEOUT call OBJ METHOD ARGS` (the CLI exits with minus the status)."""
    p = root.run(["ubus", "-t", str(timeout), "call", obj, method, json.dumps(args or {})], text=True,
                 timeout=timeout + 10)
    return -p.returncode % 256, (json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else None)


def signatures(root: OwrtRoot, obj: str) -> dict[str, dict[str, str]]:
    """`ubus -v list OBJ` as {method: {argument: type}}."""
    lines = root.ubus("-v", "list", obj).stdout.splitlines()[1:]
    return {k: v for line in lines for k, v in json.loads("{" + line.strip() + "}").items()}


def paid_channel(svc: Service, faucet, deposit: int = 30_000, pay: int = 5_000) -> PayerSession:
    """A client that opens, funds (0-conf) and pays a channel through the service's portal (enough that
    its settlement is worth its fee: less would end `uneconomic`)."""
    portal = PortalClient(f"http://127.0.0.1:{svc.servers[0].port}")
    payer = PayerSession(portal, tip_height=svc.manager.chain.tip_height, refund_address=key_address(new_key()))
    payer.open(deposit)
    key = new_key()
    coin, _ = faucet.pay(p2wpkh_script(key.pub), deposit + 5_000)
    payer.fund_from_coins([PayerCoin(c.Outpoint(coin.txid, coin.vout), coin.value, coin.script, key)],
                          p2wpkh_script(key.pub))
    payer.pay_exact(pay)
    return payer


def test_two_objects_one_for_the_command_line_one_for_luci(owrt, service):
    service()
    cli, luci = signatures(owrt, "bitmesh"), signatures(owrt, "luci.bitmesh")
    assert cli["kick"] == {"mac": "String"} and cli["status"] == {}
    assert luci["kick"] == {"mac": "String", "ubus_rpc_session": "String"}
    assert set(cli) == set(luci) == {"status", "clients", "channels", "kick", "close_channel", "earnings", "fleet",
                                     "reload"}

    status, reply = ubus_call(owrt, "bitmesh", "status")
    assert status == 0 and reply["running"] is True and reply["chain"]["ok"] is True
    # python3-ubus answers a missing or an extra argument before the service sees the call
    assert ubus_call(owrt, "bitmesh", "kick") == (2, None)
    assert ubus_call(owrt, "bitmesh", "status", {"verbose": 1}) == (2, None)
    status, reply = ubus_call(owrt, "bitmesh", "kick", {"mac": "nonsense"})
    assert status == 0 and reply["error"]["code"] == "firewall_bad_client"
    # the fleet view reads MQTT, off here (tests/test_fleet_netns.py has it on)
    status, reply = ubus_call(owrt, "bitmesh", "fleet")
    assert status == 0 and reply["error"]["code"] == "mqtt_disabled"


def test_luci_reaches_the_service_through_uhttpd_with_the_apps_acl(owrt, service):
    """uhttpd's /ubus adds ubus_rpc_session to every call and checks rpcd's ACL (the app's own
    acl.d file) before forwarding it."""
    service()
    owrt.start_rpcd([ADMIN, VIEWER])
    port = free_port()  # another than the portal's
    owrt.start_uhttpd(port)
    url = f"http://127.0.0.1:{port}"
    admin = UbusHttp(url).login(ADMIN.username, ADMIN.password)

    status, reply = admin.call("luci.bitmesh", "status")
    assert status == 0 and reply["running"] is True
    assert admin.call("luci.bitmesh", "earnings")[1]["settled_sat"] == 0
    status, reply = admin.call("luci.bitmesh", "kick", mac="02:00:00:00:00:99")
    assert status == 0 and reply["error"]["code"] == "client_unknown"
    with pytest.raises(UbusHttpError):  # the ACL grants LuCI only the object it can call
        admin.call("bitmesh", "status")

    viewer = UbusHttp(url).login(VIEWER.username, VIEWER.password)
    assert viewer.call("luci.bitmesh", "clients") == (0, {"clients": []})
    for method, args in (("kick", {"mac": "02:00:00:00:00:99"}), ("close_channel", {"channel_id": "00" * 16}),
                         ("reload", {})):
        with pytest.raises(UbusHttpError) as denied:
            viewer.call("luci.bitmesh", method, **args)
        assert "denied" in str(denied.value).lower()


def test_a_failing_command_fails_while_the_ubus_loop_runs(owrt, service):
    """libubox's SIGCHLD handler would reap `nft` before subprocess reads its exit status and the
    failure would pass as a success; the service owns SIGCHLD before its first ubus.loop()."""
    service()
    nft = Nft()
    refused = 0
    for _ in range(1000):
        try:
            nft.list_json("table", "inet", "bitmesh_no_such_table")
        except FirewallError:
            refused += 1
    assert refused == 1000


def test_objects_come_back_after_ubusd_restarts(owrt, service, faucet):
    svc = service()
    ubusd = next(p for p in owrt._procs if "/usr/sbin/ubusd" in p.args)
    ubusd.kill()
    ubusd.wait()
    owrt.ubus_socket.unlink()
    owrt.start_ubusd()
    wait_for(lambda: ubus_call(owrt, "bitmesh", "status", timeout=5)[0] == 0, 15, "bitmesh registered again")
    assert ubus_call(owrt, "luci.bitmesh", "clients", {"ubus_rpc_session": "x"}) == (0, {"clients": []})
    # events reach listeners of the new ubusd
    owrt.popen(["ubus", "listen", "bitmesh.*"], log="/tmp/log/events.jsonl")
    events = owrt.host_path("/tmp/log/events.jsonl")

    def listening() -> bool:  # the listener is up once it prints an event sent to it
        owrt.ubus("send", "bitmesh.probe", "{}")
        return events.exists() and "bitmesh.probe" in events.read_text()

    wait_for(listening, 5, "ubus listen", interval=0.1)
    payer = paid_channel(svc, faucet)
    wait_for(lambda: payer.channel_id in events.read_text(), 10, "the session event")
    started = [json.loads(line) for line in events.read_text().splitlines() if "session.start" in line]
    assert [e["bitmesh.session.start"]["deposit"] for e in started] == [30_000]


def test_calls_never_wait_for_a_hanging_chain_backend(owrt, service, proxy, faucet, bcoin):
    """A backend that hangs (here: the node behind a proxy that stops answering) holds a request
    through every retry (about a minute); the one ubus thread must not be held with it."""
    svc = service()
    payer = paid_channel(svc, faucet)
    proxy.stalled = True
    status, reply = ubus_call(owrt, "bitmesh", "status", timeout=5)
    assert status == 0 and reply["channels_open"] == 1
    status, reply = ubus_call(owrt, "bitmesh", "close_channel", {"channel_id": payer.channel_id}, timeout=5)
    assert status == 0 and reply["state"] == "settling" and reply["settlement_txid"]
    assert ubus_call(owrt, "bitmesh", "earnings", timeout=5)[1]["settling_channels"] == 1
    # once the backend answers again, the watch pass broadcasts the signed settlement
    proxy.release()
    wait_for(lambda: bcoin.mempool_has(reply["settlement_txid"]), 60, "the settlement in the mempool", 0.2)


def test_status_answers_when_the_chain_was_never_reached(owrt, service, proxy):
    proxy.stalled = True  # a router booting without uplink
    service()
    status, reply = ubus_call(owrt, "bitmesh", "status", timeout=5)
    assert status == 0 and reply["chain"]["ok"] is False and reply["chain"]["tip_height"] is None
