"""The whole hotspot in network namespaces: the real `bitmesh serve` in the router namespace of
a `Topology`, reaching a bcoin regtest node through a loopback bridge, and real `bitmesh pay`
payers in client namespaces. Used by tests/test_hotspot_netns.py, tools/demo.py and
bench/portal.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bitcoin.core import CTransaction
from bitcoin.wallet import CKey

from bitmesh.chain.address import address_to_script, p2wpkh_script
from bitmesh.channel.wire import sign_proof
from tests.support.bcoin import BcoinNode
from tests.support.coins import NETWORK, Faucet, key_address, new_key
from tests.support.consensus import verify_on_node
from tests.support.netns import Host, Topology, run_in
from tests.support.owrt import OwrtRoot

REPO = Path(__file__).resolve().parents[2]
PORTAL_PORT = 8088

# Defaults of a test router; each test overrides the tariff it is about.
ROUTER_OPTIONS = {
    "enabled": 1,
    "network": NETWORK,
    "chain_backend": "core",
    "core_rpc_user": "x",
    "price_sat_per_mb": 1000,
    "price_sat_per_minute": 0,
    "prepay_step_sat": 500,
    "min_deposit_sat": 2000,
    "max_deposit_sat": 1_000_000,
    "zero_conf_max_sat": 1_000_000,
    "expiry_blocks": 40,
    "settle_margin_blocks": 5,
    "portal_port": PORTAL_PORT,
}

_PORTAL_CALL = """
import json, sys
from bitmesh.portal.client import PortalClient, PortalError
try:
    out = getattr(PortalClient(sys.argv[1], timeout=10), sys.argv[2])(*json.loads(sys.argv[3]))
except PortalError as e:
    out = {"error": {"code": e.code, "message": e.message}}
print(json.dumps(out))
"""

_WAIT_HTTP = """
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1], timeout=1).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("no answer from " + sys.argv[1])
        time.sleep(0.05)
"""


READY_HEIGHT = 1400  # segwit (432) and CLTV (1351) active on bcoin regtest


@contextlib.contextmanager
def regtest(workdir: Path) -> Iterator[tuple[BcoinNode, Faucet]]:
    """A bcoin regtest node (the test session's, the demo's, the bench's) with a faucet, mined to
    READY_HEIGHT; stopped on exit."""
    node = BcoinNode(workdir).start()
    try:
        faucet = Faucet.mine(node)  # first, while coinbases still pay 50 BTC
        node.mine(max(0, READY_HEIGHT - node.height()), key_address(new_key()))
        yield node, faucet
    finally:
        node.stop()


def uci_config(options: dict[str, object]) -> str:
    lines = ["config bitmesh 'main'"]
    lines += [f"\toption {name} '{value}'" for name, value in options.items()]
    return "\n".join(lines) + "\n"


def python_in(ns: str, code: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run Python `code` inside `ns`, with this repository importable (bitmesh, tests)."""
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args], cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"python in {ns} failed: {p.stderr.strip()[-2000:]}")
    return p


def portal_call(ns: str, url: str, method: str, *args) -> dict:
    """`PortalClient(url).method(*args)` made from inside `ns` (so the portal sees that client);
    a refusal comes back as {"error": {...}}."""
    return json.loads(python_in(ns, _PORTAL_CALL, url, method, json.dumps(args)).stdout)


@dataclass
class RouterService:
    """`bitmesh serve` (firewall on) in the router namespace, as procd would run it."""

    topo: Topology
    node: BcoinNode
    workdir: Path
    options: dict[str, object] = field(default_factory=dict)
    payout_address: str = field(default_factory=lambda: key_address(new_key()))
    with_ubus: bool = False  # register the ubus objects with OpenWrt's real ubusd (tests/support/owrt.py)
    serve_args: tuple[str, ...] = ()  # more `bitmesh serve` options (e.g. test-only --pricing-interval)
    host: Host | None = None  # the namespace it runs in: topo.router, or topo.upstream as the second hop
    proc: subprocess.Popen | None = None
    owrt: OwrtRoot | None = None  # where ubusd runs, with_ubus
    _listener: subprocess.Popen | None = None  # `ubus listen 'bitmesh.*'`

    def __post_init__(self) -> None:
        self.host = self.host or self.topo.router
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "config" / "bitmesh"  # a UCI file is named like its package
        self.config.parent.mkdir(exist_ok=True)
        self.log = self.workdir / "service.log"
        self.config.write_text(uci_config({
            **ROUTER_OPTIONS,
            "interface": self.topo.LAN,
            "core_rpc_url": f"http://127.0.0.1:{self.node.rpc_port}/",
            "core_rpc_password": self.node.api_key,
            "payout_address": self.payout_address,
            "state_dir": self.workdir / "state",
            **self.options,
        }))

    @property
    def port(self) -> int:
        return int(self.options.get("portal_port", PORTAL_PORT))

    @property
    def url(self) -> str:
        return f"http://{self.host.ipv4}:{self.port}"

    def start(self, timeout: float = 20.0) -> RouterService:
        env = dict(os.environ)
        argv = ["ip", "netns", "exec", self.host.ns, sys.executable, "-m", "bitmesh.cli", "serve",
                "--config", str(self.config), "--watch-interval", "1", *self.serve_args]
        if self.with_ubus:
            if self.owrt is None:
                self.owrt = OwrtRoot(self.workdir / "owrt").start()
                self.owrt.start_ubusd()
                self._listener = self.owrt.popen(["ubus", "listen", "bitmesh.*"], log="/tmp/log/events.jsonl")
            argv += ["--ubus-socket", str(self.owrt.ubus_socket)]
        else:
            argv.append("--no-ubus")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            python_in(self.host.ns, _WAIT_HTTP, f"{self.url}/api/offer", str(timeout), timeout=timeout + 5)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"service did not come up:\n{self.log.read_text()[-3000:]}") from None
        return self

    def ubus_call(self, method: str, **args) -> dict:
        """`ubus call bitmesh METHOD ARGS` with OpenWrt's ubus command line; a call ubus itself
        refuses (e.g. Invalid argument) raises UbusCallError."""
        assert self.owrt is not None, "started without ubus"
        p = self.owrt.ubus("call", "bitmesh", method, json.dumps(args))
        if p.returncode != 0:  # the command line exits with minus the ubus status
            raise UbusCallError(-p.returncode % 256, p.stderr.strip().splitlines()[0])
        return json.loads(p.stdout)

    def ubus_events(self) -> list[tuple[str, dict]]:
        """What `ubus listen 'bitmesh.*'` printed so far."""
        assert self.owrt is not None, "started without ubus"
        path = self.owrt.host_path("/tmp/log/events.jsonl")
        lines = path.read_text().splitlines() if path.exists() else []
        return [next(iter(json.loads(line).items())) for line in lines if line.strip()]

    def kill(self) -> None:
        """SIGKILL: no clean-up at all (what a crash or the OOM killer does)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM removes the firewall table
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.owrt is not None:
            self.owrt.stop()
            self.owrt = None


class UbusCallError(Exception):
    """`ubus call` failed before the service answered: ubus status (2 = Invalid argument ...)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"ubus status {status}: {message}")
        self.status = status
        self.message = message


def funding_key(faucet: Faucet, sats: int) -> tuple[str, str]:
    """A fresh key holding one coin of `sats` (unconfirmed): (key hex, "TXID:VOUT:SATS")."""
    secret = secrets.token_bytes(32)
    coin, _ = faucet.pay(p2wpkh_script(CKey(secret, compressed=True).pub), sats)
    return secret.hex(), f"{coin.txid}:{coin.vout}:{coin.value}"


class Payer:
    """`bitmesh pay` running in a client namespace; its output lines are collected with the
    time each was read."""

    def __init__(self, topo: Topology, client: Host, service: RouterService, faucet: Faucet, deposit: int,
                 workdir: Path, duration: float = 120.0, interval: float = 0.2):
        self.deposit = deposit
        self.refund_address = key_address(new_key())
        key, coin = funding_key(faucet, deposit + 3_000)
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr = workdir / "payer.err"
        self.client, self.url = client, service.url
        self.channel_file = workdir / "channel.json"  # the channel's key: what proves it to the router
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", client.ns, sys.executable, "-m", "bitmesh.cli", "pay",
                 "--portal", service.url, "--deposit", str(deposit), "--refund-address", self.refund_address,
                 "--fund-key", key, "--coin", coin, "--refund-file", str(workdir / "refund.hex"),
                 "--channel-file", str(self.channel_file),
                 "--duration", str(duration), "--interval", str(interval)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new:
                self.lines.append((time.time(), line.rstrip("\n")))
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match:
        """The first output line (from index `after` on) matching `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for _, line in self.lines[after:]:
                    if m := rx.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reading()):
                    raise AssertionError(f"payer never printed /{pattern}/; output: {self.output()}")
                self._new.wait(min(left, 0.2))

    def _reading(self) -> bool:
        return self.proc.stdout is not None and not self.proc.stdout.closed and self.proc.poll() is None

    @property
    def channel_id(self) -> str:
        return self.wait_for(r"^channel ([0-9a-f]{32}):").group(1)

    def proof(self, action: str) -> str:
        """The channel's proof for `action` ("session", "close"), made with the key it saved."""
        self.wait_for(r"^the channel's key .* saved to ")
        record = json.loads(self.channel_file.read_text())
        return sign_proof(CKey(bytes.fromhex(record["client_secret"]), compressed=True), action,
                          record["channel_id"])

    def session(self) -> dict:
        """The channel's session (private: read with its proof) from the payer's namespace."""
        return portal_call(self.client.ns, self.url, "session", self.channel_id, self.proof("session"))

    def close(self) -> dict:
        """Close the channel with its proof, from the payer's namespace (as `bitmesh close` does)."""
        return portal_call(self.client.ns, self.url, "close", self.channel_id, self.proof("close"))

    def payments(self) -> list[int]:
        return [int(m.group(1)) for _, line in self.lines if (m := re.match(r"paid (\d+) sat", line))]

    def output(self) -> str:
        err = self.stderr.read_text(errors="replace")[-2000:] if self.stderr.exists() else ""
        return "\n".join(line for _, line in self.lines) + (f"\nstderr:\n{err}" if err else "")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)


@dataclass(frozen=True)
class Settlement:
    txid: str
    confirmations: int
    change: int  # output 0: deposit - paid, as the client signed it
    payout: int  # to the owner: owed - fee (plus an unused part too small to return)
    unused: int  # paid but not used, back to the client
    fee: int


def read_settlement(node: BcoinNode, txid: str, deposit: int, refund_address: str,
                    payout_address: str) -> Settlement:
    """The settlement as the node has it, each output told apart by its script; its input checked by
    Bitcoin Core's consensus interpreter as well. The owner's share is the one output that is not
    the client's: the router's hold output (docs/protocol.md 3.4), from where `read_payout`
    follows it to `payout_address`."""
    tx = verify_on_node(node, txid)
    confirmations = int(node.rpc("getrawtransaction", txid, 1).get("confirmations") or 0)
    refund = address_to_script(refund_address, NETWORK)
    outs = [(o.nValue, bytes(o.scriptPubKey)) for o in tx.vout]
    owners = [(v, s) for v, s in outs if s != refund]
    assert len(owners) <= 1 and all(len(s) == 22 and s[:2] == b"\x00\x14" for _, s in owners), \
        f"the owner's share is one P2WPKH hold output: {outs}"
    change = outs[0][0] if outs and outs[0][1] == refund else 0
    to_owner = sum(v for v, _ in owners)
    unused = sum(v for v, s in outs if s == refund) - change
    return Settlement(txid, confirmations, change, to_owner, unused, deposit - sum(v for v, _ in outs))


def read_payout(node: BcoinNode, payout_txid: str, payout_address: str) -> int:
    """What the router's payout transaction (the hold output moved on) pays `payout_address`,
    checked by Core's interpreter."""
    tx = verify_on_node(node, payout_txid)
    payout = address_to_script(payout_address, NETWORK)
    assert all(bytes(o.scriptPubKey) == payout for o in tx.vout), "a payout pays the owner only"
    return sum(o.nValue for o in tx.vout)


def wait_payout(node: BcoinNode, settlement_txid: str, payout_address: str, timeout: float = 30.0) -> tuple[str, int]:
    """(txid, sat) of the transaction the router sends to move the owner's share on from the
    settlement's hold output to `payout_address` (it does once the settlement is in a block):
    found in the node's mempool, checked by Core's interpreter."""
    deadline = time.monotonic() + timeout
    while True:
        for txid in node.rpc("getrawmempool"):
            tx = CTransaction.deserialize(bytes.fromhex(node.rpc("getrawtransaction", txid)))
            if any(i.prevout.hash[::-1].hex() == settlement_txid for i in tx.vin):
                return txid, read_payout(node, txid, payout_address)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no payout of {settlement_txid} in the mempool")
        time.sleep(0.2)


def expected_split(deposit: int, paid: int, owed: int, fee: int, dust: int = 546) -> tuple[int, int, int]:
    """(change, owner's output, unused) the protocol prescribes (docs/protocol.md 3.4) for a
    settlement whose fee (deposit minus the outputs) is `fee`: the owner pays the fee out of
    `owed`; unused credit below dust is dropped into the fee, never into the owner's output."""
    unused = paid - owed
    dropped = unused if unused < dust else 0
    return deposit - paid, owed - (fee - dropped), unused - dropped


@contextlib.contextmanager
def router_services(topo: Topology) -> Iterator[list[RouterService]]:
    """The services a test starts (it appends them): stopped at the end, and the router's neighbour
    table flushed so that the next test's devices are learned afresh."""
    started: list[RouterService] = []
    try:
        yield started
    finally:
        for service in started:
            service.stop()
        run_in(topo.router.ns, "ip", "neigh", "flush", "dev", topo.LAN)


@contextlib.contextmanager
def payers(topo: Topology, faucet: Faucet, workdir: Path, counted: tuple[str, ...] = ()) -> Iterator:
    """`pay(service, deposit, client=0, **kw)`: a real `bitmesh pay` in a client namespace
    (`client`: an index into topo.clients or a Host); each one killed at the end. The byte
    counters of the namespaces in `counted` are zeroed before each payer starts."""
    started: list[Payer] = []

    def pay(service: RouterService, deposit: int, client: int | Host = 0, **kw) -> Payer:
        for ns in counted:
            topo.reset_counters(ns)
        host = topo.clients[client] if isinstance(client, int) else client
        payer = Payer(topo, host, service, faucet, deposit, workdir / f"payer{len(started)}", **kw)
        started.append(payer)
        return payer

    try:
        yield pay
    finally:
        for payer in started:
            payer.kill()


@contextlib.contextmanager
def gate_in(topo: Topology, config) -> Iterator:
    """A Gate (bitmesh.firewall) on the router namespace's nft, started with no client, the
    byte counters of upstream and the first client zeroed; stopped afterwards and the router's
    neighbour table flushed."""
    from bitmesh.firewall import Gate, Nft

    gate = Gate(config, Nft(topo.nft_argv()))
    gate.start([])
    for ns in (topo.upstream.ns, topo.clients[0].ns):
        topo.reset_counters(ns)
    try:
        yield gate
    finally:
        gate.stop()
        run_in(topo.router.ns, "ip", "neigh", "flush", "dev", topo.LAN)
