"""The many-client soak: hundreds of devices open channels, pay and browse through the real
service for a while, then every channel settles and every satoshi is accounted for.

Layout (tests/support/netns.py): one client namespace whose link into the router's br-lan
carries `clients` macvlan devices (Topology.macvlan_clients), each its own MAC, IPv4 and IPv6;
the real `bitmesh serve` (firewall on) in the router namespace on a bcoin regtest node
(tests/support/router.py RouterService); an upstream web server. The router sees as many
devices as there are clients: its neighbour table, the gate's MAC . IP grants and the ledger's
channels hold one entry per device.

The payers are one driver process inside the client namespace (`python -m tests.support.soak
PLAN OUT`) with one thread per client, not one `bitmesh pay` each: 200 interpreters would take
about 5 GB and most of two cores just to start. Each thread holds a PayerSession
(bitmesh/paying.py, what `bitmesh pay` runs) and does what `bitmesh pay` does, with every socket
bound to its own device's address (so the portal and the gate see that device): open, keep the
refund, fund from its own coin (the router broadcasts it), then every `poll_seconds` (the
browser wallet's POLL_MS) one look at its session and, when its credit is below half a step, a
payment for what the router says is owed (checked against the tariff fixed at open) plus one
step (paycli._pay_round's rule), and one download of `chunk_bytes` from upstream, over IPv4 and
IPv6 in turn. At the end it closes its channel.

What is checked, per client (`Outcome`), against the chain (every settlement and payout through
Bitcoin Core's interpreter, via read_settlement / read_payout):
  acknowledged = the last amount the router acknowledged (the payer's `paid`);
  settled      = deposit - the change the settlement returns on output 0 (what it took);
  owed         = what the router says was used, fixed at settlement; it must be the tariff applied to
                 the bytes the client's own namespace counted to and from upstream (nft counters
                 per device, independent of the router) within one prepay step, and
                 acknowledged - owed must lie within [0, one step] (the payer stays one step ahead);
  lost_sat     = |acknowledged - settled|
                 + client side: (deposit - acknowledged + unused owed back) - what reached its refund
                   address (change + unused), where unused owed back = acknowledged - owed when it
                   is at least 546 sat, else 0 (dropped into the fee, as the offer's fee_policy says)
                 + owner side: (owed - the fees the router chose: settlement fee less a dropped
                   unused part, and the payout's fee) - what reached the payout address.
  A channel that is not settled loses all it acknowledged. soak.lost_sat is the sum: must be 0.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UPSTREAM_PORT = 8080  # not captured for unpaid clients (only 80 is): no byte reaches it unpaid
DUST = 546


@dataclass(frozen=True)
class SoakConfig:
    """Defaults: the 1-minute soak of `make test`. Payments are dimensioned to stay below what
    the router takes with 200 grants (about 5 a second: each payment re-reads the whole nft
    table under the channel manager's lock): each client pays its first step at funding and
    about once more in the minute."""

    clients: int = 200
    seconds: float = 60.0  # browsing and paying, after every client has opened, funded and paid once
    deposit: int = 20_000
    price_sat_per_mb: int = 5_000  # usage of a few thousand sat a client: settlements pay their fee
    prepay_step_sat: int = 4_000
    poll_seconds: float = 2.0  # the browser wallet's POLL_MS
    chunk_bytes: int = 20_000  # a download a poll, 0.5 to 1.5 times this per client: ~10 kB/s a client
    families: tuple[str, ...] = ("4", "6")
    setup_concurrency: int = 16  # opens, fundings and first payments in flight at once


# --- the driver: runs inside the client namespace --------------------------------------------------

_bound = threading.local()


class _SourceBoundHTTPHandler(urllib.request.HTTPHandler):
    """urllib (PortalClient's transport) from this thread's device address: the portal sees the
    device, not the namespace's first address."""

    def http_open(self, req):
        return self.do_open(functools.partial(http.client.HTTPConnection, source_address=(_bound.address, 0)), req)


def _fetch(source: str, host: str, nbytes: int, timeout: float = 10.0) -> int:
    """Download `nbytes` from the upstream server from `source`: the body bytes received."""
    conn = http.client.HTTPConnection(host, UPSTREAM_PORT, timeout=timeout, source_address=(source, 0))
    got = 0
    try:
        conn.request("GET", f"/bytes/{nbytes}")
        resp = conn.getresponse()
        while chunk := resp.read(65536):
            got += len(chunk)
    finally:
        conn.close()
    return got


@dataclass
class ClientRun:
    """What one driver thread did and saw."""

    name: str
    mac: str
    ipv4: str
    ipv6: str
    channel_id: str | None = None
    deposit: int = 0
    acknowledged: int = 0  # the payer's `paid`: the largest amount the router acknowledged
    payments: int = 0
    browsed: dict[str, int] = field(default_factory=dict)  # family -> body bytes downloaded
    setup_s: float = 0.0
    session_ms: list[float] = field(default_factory=list)
    pay_ms: list[float] = field(default_factory=list)
    transient_errors: list[str] = field(default_factory=list)  # 5xx, timeouts: retried
    browse_errors: list[str] = field(default_factory=list)
    error: str | None = None  # the client gave up
    closed: dict | None = None  # the close answer: state, settlement_txid, paid, owed


def _transient(e: Exception) -> bool:
    """What `bitmesh pay` rides out and tries again at its next round: transport errors and 5xx
    (server_busy from the portal's bounded queue among them); a 4xx refusal is final."""
    from bitmesh.portal.client import PortalError

    return isinstance(e, OSError | http.client.HTTPException) or isinstance(e, PortalError) and e.http_status >= 500


def _retrying(run: ClientRun, fn: Callable[[], dict], seconds: float = 60.0) -> dict:
    """A portal call that must happen (open, fund, the first payment, close), tried again after
    what `bitmesh pay` retries, for up to `seconds`; each retry is recorded."""
    deadline = time.monotonic() + seconds
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not _transient(e) or time.monotonic() > deadline:
                raise
            run.transient_errors.append(_describe(e))
            attempt += 1
            time.sleep(min(2.0, 0.25 * attempt))


def _describe(e: Exception) -> str:
    code = getattr(e, "code", None)
    return f"{type(e).__name__}: {code}" if isinstance(code, str) else f"{type(e).__name__}: {e}"


def _drive(plan: dict, spec: dict, run: ClientRun, gate: threading.Semaphore, browsing: threading.Barrier) -> None:
    from bitmesh.chain.address import p2wpkh_script
    from bitmesh.paycli import parse_coin, parse_key
    from bitmesh.paying import PayerSession
    from bitmesh.portal.client import PortalClient, PortalError

    _bound.address = spec["ipv4"]
    portal = PortalClient(plan["portal"], timeout=30)
    session = PayerSession(portal, lambda: int(plan["tip_height"]), spec["refund_address"])
    try:
        with gate:
            t0 = time.monotonic()
            _retrying(run, lambda: session.open(plan["deposit"]))
            run.channel_id, run.deposit = session.channel_id, plan["deposit"]
            key = parse_key(spec["key"])
            _retrying(run, lambda: session.fund_from_coins([parse_coin(spec["coin"], key)], p2wpkh_script(key.pub)))
            # `bitmesh pay`'s first round right after the funding: nothing used yet, one step ahead
            t = time.monotonic()
            _retrying(run, lambda: session.pay_for(0))
            run.pay_ms.append((time.monotonic() - t) * 1000)
            run.payments += 1
            run.acknowledged = session.channel.paid
            run.setup_s = time.monotonic() - t0
    except Exception as e:
        run.error = f"setup: {e!r}"
    try:
        browsing.wait(timeout=600)
    except threading.BrokenBarrierError:
        pass
    if run.error:
        return
    ch = session.channel
    assert ch is not None
    step = session.prepay_step
    end = plan["end"]
    sources = {"4": (spec["ipv4"], plan["upstream4"]), "6": (spec["ipv6"], plan["upstream6"])}
    families = plan["families"]
    rng = random.Random(spec["ipv4"])
    # Devices browse at different rates (0.5 to 1.5 times chunk_bytes a poll): their payments
    # spread out instead of coming due in the same second.
    chunk = int(plan["chunk_bytes"] * rng.uniform(0.5, 1.5))
    next_poll = time.monotonic() + rng.uniform(0, plan["poll_seconds"])  # spread the clients' polls
    turn = 0
    try:
        while True:
            time.sleep(max(0.0, next_poll - time.monotonic()))
            if time.time() >= end:
                break
            next_poll += plan["poll_seconds"]
            # paycli._pay_round: the meter's figure, checked, and one step ahead when credit is low;
            # a round the portal does not answer (busy, timeout) is skipped, as `bitmesh pay` does
            try:
                t = time.monotonic()
                s = session.session()  # the channel's session, proven by its key
                run.session_ms.append((time.monotonic() - t) * 1000)
                if s["state"] == "closed":
                    raise AssertionError(f"the router closed the channel ({s['channel_state']})")
                if s.get("channel_id") != session.channel_id:
                    raise AssertionError(f"the session names channel {s.get('channel_id')}, not {session.channel_id}")
                owed = session.checked_owed(s)
                if ch.paid - owed < max(1, step // 2) and ch.paid < ch.deposit:
                    t = time.monotonic()
                    session.pay_for(owed)
                    run.pay_ms.append((time.monotonic() - t) * 1000)
                    run.payments += 1
            except Exception as e:
                if not _transient(e):
                    raise
                run.transient_errors.append(_describe(e))
                continue
            finally:
                run.acknowledged = ch.paid
            family = families[turn % len(families)]
            turn += 1
            if ch.paid > owed:  # browse only with credit: nothing unpaid crosses the router
                source, host = sources[family]
                try:
                    run.browsed[family] = run.browsed.get(family, 0) + _fetch(source, host, chunk)
                except (OSError, http.client.HTTPException) as e:
                    run.browse_errors.append(f"IPv{family}: {e!r}")
    except Exception as e:
        run.error = f"browsing: {e!r}"
    finally:
        run.acknowledged = ch.paid
        try:
            run.closed = _retrying(run, session.close, seconds=180.0)
        except PortalError as e:
            run.error = (run.error or "") + f"; close: {e.code}: {e.message}"
        except Exception as e:
            run.error = (run.error or "") + f"; close: {e!r}"


def drive(plan_path: Path, out_path: Path) -> None:
    """The driver's main: one thread per client of the plan; prints BROWSING once every client
    has opened and funded (or failed to), writes every ClientRun to `out_path` at the end."""
    plan = json.loads(plan_path.read_text())
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                              _SourceBoundHTTPHandler()))
    specs = plan["clients"]
    runs = [ClientRun(s["name"], s["mac"], s["ipv4"], s["ipv6"]) for s in specs]
    gate = threading.Semaphore(plan["setup_concurrency"])
    started = time.monotonic()

    def all_funded() -> None:
        plan["end"] = time.time() + plan["seconds"]
        print(f"BROWSING {time.monotonic() - started:.1f}", flush=True)

    browsing = threading.Barrier(len(specs), action=all_funded)
    threads = [threading.Thread(target=_drive, args=(plan, s, r, gate, browsing), daemon=True, name=s["name"])
               for s, r in zip(specs, runs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out_path.write_text(json.dumps([asdict(r) for r in runs]))
    print("DONE", flush=True)


# --- the harness: runs in the test process -------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One client's channel, judged against the chain (see the module docstring)."""

    name: str
    mac: str
    ipv4: str
    channel_id: str | None
    deposit: int
    acknowledged: int
    settled: int | None  # deposit - change; None: no confirmed settlement
    owed: int | None
    measured_owed: int  # the tariff applied to the bytes the client's namespace counted upstream
    measured_bytes: int
    payments: int
    browsed: dict[str, int]
    lost_sat: int
    problems: tuple[str, ...]


@dataclass
class SoakReport:
    config: SoakConfig
    outcomes: list[Outcome]
    figures: dict[str, object]
    gate_clients: set[tuple[str, str]]  # (mac, ip) the gate held mid-soak
    ledger_clients: set[tuple[str, str]]  # (mac, ip) of the ledger's open channels mid-soak
    runs: list[dict]  # the driver's ClientRun records
    judge: Callable[[dict], Outcome]  # judges a ClientRun record against the chain as the soak did

    @property
    def problems(self) -> list[str]:
        return [f"{o.name}: {p}" for o in self.outcomes for p in o.problems]


class _Sampler:
    """VmRSS / VmHWM / Threads of a process, and its CPU time, every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.rss_kb: list[int] = []
        self.hwm_kb = 0
        self.threads_max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def status(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                out[name] = int(value.split()[0])
        return out

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def sample(self) -> dict[str, int]:
        s = self.status()
        self.rss_kb.append(s["VmRSS"])
        self.hwm_kb = max(self.hwm_kb, s["VmHWM"])
        self.threads_max = max(self.threads_max, s["Threads"])
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except OSError:
                return

    def start(self) -> _Sampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.sample()


_METER_TABLE = "soakmeter"


def _install_client_meter(topo, ns: str, hosts) -> None:
    """Per-device byte counters in the client namespace, independent of the router: IP bytes to
    the upstream server (output hook, by outgoing device) and from it (input hook, by incoming
    device), both families: what the router's gate counts for the device, seen from the device."""
    names = ", ".join(f'"{h.ifname}"' for h in hosts)
    up4, up6 = topo.upstream.ipv4, topo.upstream.ipv6
    text = f"""table inet {_METER_TABLE} {{
    set sent {{ type ifname; counter; elements = {{ {names} }} }}
    set received {{ type ifname; counter; elements = {{ {names} }} }}
    chain out {{ type filter hook output priority 0; policy accept;
        ip daddr {up4} oifname @sent
        ip6 daddr {up6} oifname @sent
    }}
    chain in {{ type filter hook input priority 0; policy accept;
        ip saddr {up4} iifname @received
        ip6 saddr {up6} iifname @received
    }}
}}
"""
    from tests.support.netns import run_in

    run_in(ns, "nft", "-f", "-", input=text)


def _read_client_meter(ns: str) -> dict[str, int]:
    from tests.support.netns import run_in

    counts: dict[str, int] = {}
    for name in ("sent", "received"):
        data = json.loads(run_in(ns, "nft", "-j", "list", "set", "inet", _METER_TABLE, name).stdout)
        for obj in data["nftables"]:
            for e in (obj.get("set") or {}).get("elem", []) or []:
                elem = e["elem"]
                counts[elem["val"]] = counts.get(elem["val"], 0) + int(elem["counter"]["bytes"])
    return counts


def _gate_clients(router_ns: str) -> set[tuple[str, str]]:
    """(mac, ip) of every IPv4 grant in the gate (`paid4`), as the kernel holds it."""
    from tests.support.netns import run_in

    data = json.loads(run_in(router_ns, "nft", "-j", "list", "set", "inet", "bitmesh", "paid4").stdout)
    out = set()
    for obj in data["nftables"]:
        for e in (obj.get("set") or {}).get("elem", []) or []:
            val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
            mac, ip = val["concat"]
            out.add((mac.lower(), ip))
    return out


def _ledger_clients(journal: Path) -> set[tuple[str, str]]:
    """(mac, ip) of the open channels the journal holds (read with the ledger's own pure replay)."""
    from bitmesh.channel.ledger import replay
    from bitmesh.channel.state import Phase

    lines = journal.read_bytes().splitlines(keepends=True)
    channels = replay(lines, str(journal)).channels.values()
    return {(ch.client_mac, ch.client_ip) for ch in channels if ch.phase is Phase.OPEN}


def _spends_in_mempool(node) -> dict[str, str]:
    """{txid spent by a mempool transaction: that transaction's txid}."""
    from bitcoin.core import CTransaction

    spends = {}
    for txid in node.rpc("getrawmempool"):
        tx = CTransaction.deserialize(bytes.fromhex(node.rpc("getrawtransaction", txid)))
        for txin in tx.vin:
            spends[txin.prevout.hash[::-1].hex()] = txid
    return spends


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * q))], 1)


def run_soak(node, faucet, workdir: Path, cfg: SoakConfig = SoakConfig(), log: Callable[[str], None] = print
             ) -> SoakReport:
    """The whole soak on `node` (a regtest node at READY_HEIGHT with `faucet`); see the module doc."""
    from bitcoin.wallet import CKey

    from bitmesh.chain.address import p2wpkh_script
    from bitmesh.tariff import Tariff
    from tests.support.coins import key_address, new_key
    from tests.support.netns import Topology
    from tests.support.router import RouterService, read_payout, read_settlement

    workdir.mkdir(parents=True, exist_ok=True)
    coin_value = cfg.deposit + 3_000  # the funding's fee and a change output
    if faucet.capacity(coin_value) < cfg.clients:
        raise RuntimeError(f"the faucet cannot fund {cfg.clients} clients of {coin_value} sat")
    secrets_ = [os.urandom(32) for _ in range(cfg.clients)]
    coins = faucet.pay_many([(p2wpkh_script(CKey(s, compressed=True).pub), coin_value) for s in secrets_])
    node.mine(1, key_address(new_key()))  # the clients' coins confirmed: no 0-conf parent to judge
    tariff = Tariff(cfg.price_sat_per_mb, 0)
    options = {
        "price_sat_per_mb": cfg.price_sat_per_mb, "price_sat_per_minute": 0, "prepay_step_sat": cfg.prepay_step_sat,
        "min_deposit_sat": min(cfg.deposit, max(2_000, cfg.prepay_step_sat)),
        "max_deposit_sat": max(cfg.deposit, 1_000_000),
        "zero_conf_max_sat": cfg.deposit, "zero_conf_total_max_sat": cfg.deposit * cfg.clients,
    }
    timings: dict[str, float] = {}
    with Topology(n_clients=1) as topo:
        t0 = time.monotonic()
        parent = topo.clients[0]
        hosts = topo.macvlan_clients(parent, cfg.clients)
        topo.bridge_tcp(topo.router.ns, node.rpc_port, ("127.0.0.1", node.rpc_port))
        topo.http_server(topo.upstream.ns, "UPSTREAM", [UPSTREAM_PORT])
        _install_client_meter(topo, parent.ns, hosts)
        timings["topology_s"] = time.monotonic() - t0
        service = RouterService(topo, node, workdir / "router", options).start()
        try:
            sampler = _Sampler(service.proc.pid).start()
            idle = sampler.status()
            cpu0 = sampler.cpu_seconds()
            refund_addresses = [key_address(new_key()) for _ in hosts]
            plan = {
                "portal": service.url, "tip_height": node.height(), "deposit": cfg.deposit,
                "seconds": cfg.seconds, "poll_seconds": cfg.poll_seconds, "chunk_bytes": cfg.chunk_bytes,
                "families": list(cfg.families), "setup_concurrency": cfg.setup_concurrency,
                "upstream4": topo.upstream.ipv4, "upstream6": topo.upstream.ipv6,
                "clients": [{"name": h.ifname, "mac": h.mac, "ipv4": h.ipv4, "ipv6": h.ipv6, "key": s.hex(),
                             "coin": f"{c.txid}:{c.vout}:{c.value}", "refund_address": a}
                            for h, s, c, a in zip(hosts, secrets_, coins, refund_addresses, strict=True)],
            }
            plan_path, out_path = workdir / "plan.json", workdir / "runs.json"
            plan_path.write_text(json.dumps(plan))
            driver = subprocess.Popen(
                ["ip", "netns", "exec", parent.ns, sys.executable, "-m", "tests.support.soak", str(plan_path),
                 str(out_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=open(workdir / "driver.err", "wb"),
                text=True)  # fmt: skip
            t0 = time.monotonic()
            line = driver.stdout.readline()
            if not line.startswith("BROWSING"):
                driver.kill()
                raise RuntimeError(f"driver failed: {(workdir / 'driver.err').read_text()[-3000:]}")
            timings["open_and_fund_s"] = time.monotonic() - t0
            log(f"soak: {cfg.clients} clients opened and funded in {timings['open_and_fund_s']:.1f} s; "
                f"browsing for {cfg.seconds:.0f} s")
            t_browse = time.monotonic()
            time.sleep(cfg.seconds / 2)
            gate_clients = _gate_clients(topo.router.ns)
            ledger_clients = _ledger_clients(workdir / "router" / "state" / "channels.journal")
            mid = sampler.sample()
            line = driver.stdout.readline()
            driver.wait(timeout=cfg.seconds + 600)
            browse_and_close_s = time.monotonic() - t_browse
            if not line.startswith("DONE"):
                raise RuntimeError(f"driver failed: {(workdir / 'driver.err').read_text()[-3000:]}")
            runs = json.loads(out_path.read_text())
            cpu = sampler.cpu_seconds() - cpu0
            end = sampler.sample()
            measured = _read_client_meter(parent.ns)
            # Settlements in a block; the router then moves each owner's share on (the payout).
            t0 = time.monotonic()
            settlement_ids = {r["closed"]["settlement_txid"] for r in runs if r["closed"]} - {None}
            node.mine(1, key_address(new_key()))
            deadline = time.monotonic() + 180
            while True:
                payouts = {t: p for t, p in _spends_in_mempool(node).items() if t in settlement_ids}
                if len(payouts) == len(settlement_ids) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            node.mine(1, key_address(new_key()))
            timings["settle_s"] = time.monotonic() - t0
            peak = sampler.stop()
        finally:
            service.stop()
        refund_of = {h.ifname: a for h, a in zip(hosts, refund_addresses, strict=True)}

        def judge(run: dict) -> Outcome:
            return _judge(node, run, refund_of[run["name"]], service.payout_address, payouts, tariff,
                          measured.get(run["name"], 0), cfg.prepay_step_sat, read_settlement, read_payout)

        outcomes = [judge(run) for run in runs]
    payments = sum(r["payments"] for r in runs)
    session_ms = [v for r in runs for v in r["session_ms"]]
    pay_ms = [v for r in runs for v in r["pay_ms"]]
    figures: dict[str, object] = {
        "soak.clients": sum(1 for o in outcomes if o.settled is not None and not o.problems),
        "soak.lost_sat": sum(o.lost_sat for o in outcomes),
        "soak.seconds": cfg.seconds,
        "soak.payments": payments,
        "soak.payments_per_s": round(payments / cfg.seconds, 1),
        "soak.settlements_confirmed": sum(1 for o in outcomes if o.settled is not None),
        "soak.payouts": len(payouts),
        "soak.browsed_mb": round(sum(sum(r["browsed"].values()) for r in runs) / 1e6, 1),
        "soak.session_p50_ms": _percentile(session_ms, 0.5),
        "soak.session_p99_ms": _percentile(session_ms, 0.99),
        "soak.pay_p50_ms": _percentile(pay_ms, 0.5),
        "soak.pay_p99_ms": _percentile(pay_ms, 0.99),
        "soak.transient_errors": sum(len(r["transient_errors"]) for r in runs),
        # 503 server_busy answers among them (the portal's queue was full): a wallet polling its
        # session is the normal case, 200 of them must not be turned away
        "soak.server_busy": sum(e.endswith(": server_busy") for r in runs for e in r["transient_errors"]),
        "soak.browse_errors": sum(len(r["browse_errors"]) for r in runs),
        "soak.max_meter_error_sat": max((abs(o.owed - o.measured_owed) for o in outcomes if o.owed is not None),
                                        default=None),
        "soak.max_credit_left_sat": max((o.acknowledged - o.owed for o in outcomes if o.owed is not None),
                                        default=None),
        "soak.open_and_fund_s": round(timings["open_and_fund_s"], 1),
        "soak.settle_s": round(timings["settle_s"], 1),
        "soak.browse_and_close_s": round(browse_and_close_s, 1),
        "service.rss_mb_idle": round(idle["VmRSS"] / 1024, 1),
        "service.rss_mb_200_clients": round(max(peak["VmHWM"], sampler.hwm_kb) / 1024, 1),
        "service.rss_mb_200_clients_mid": round(mid["VmRSS"] / 1024, 1),
        "service.rss_mb_200_clients_end": round(end["VmRSS"] / 1024, 1),
        "service.threads_max": sampler.threads_max,
        "service.cpu_percent_soak": round(100 * cpu / max(1e-9, browse_and_close_s + timings["open_and_fund_s"]), 1),
    }
    return SoakReport(cfg, outcomes, figures, gate_clients, ledger_clients, runs, judge)


def _judge(node, run: dict, refund_address: str, payout_address: str, payouts: dict[str, str], tariff,
           measured_bytes: int, step: int, read_settlement, read_payout) -> Outcome:
    problems: list[str] = []
    if run["error"]:
        problems.append(run["error"])
    ack, deposit = run["acknowledged"], run["deposit"]
    measured_owed = tariff.owed(measured_bytes, 0)
    closed = run["closed"] or {}
    txid = closed.get("settlement_txid")
    settled = owed = None
    lost = ack  # nothing settled: all it acknowledged is lost to the owner
    if not txid:
        problems.append(f"no settlement (close answered {closed})")
    else:
        owed = int(closed["owed"])
        s = read_settlement(node, txid, deposit, refund_address, payout_address)
        if s.confirmations < 1:
            problems.append(f"settlement {txid} not confirmed")
        else:
            settled = deposit - s.change
            unused_back = ack - owed if ack - owed >= DUST else 0
            dropped = ack - owed - unused_back
            settlement_fee = s.fee - dropped
            client_lost = max(0, (deposit - ack + unused_back) - (s.change + s.unused))
            payout_txid = payouts.get(txid)
            owner_got = payout_fee = 0
            if payout_txid is None:
                problems.append(f"no payout of settlement {txid}")
            else:
                owner_got = read_payout(node, payout_txid, payout_address)
                payout_fee = s.payout - owner_got
                if int(node.rpc("getrawtransaction", payout_txid, 1).get("confirmations") or 0) < 1:
                    problems.append(f"payout {payout_txid} not confirmed")
            owner_lost = max(0, (owed - settlement_fee - payout_fee) - owner_got)
            lost = abs(ack - settled) + client_lost + owner_lost
            if lost:
                problems.append(f"lost {lost} sat: acknowledged {ack}, settled {settled}, client {client_lost}, "
                                f"owner {owner_lost}")
        if not 0 <= ack - owed <= step:
            problems.append(f"acknowledged {ack} is not within one step ({step}) above owed {owed}")
        if abs(owed - measured_owed) > step:
            problems.append(f"owed {owed} vs {measured_owed} for the {measured_bytes} bytes the client counted")
    if not any(run["browsed"].values()):
        problems.append("browsed nothing")
    return Outcome(run["name"], run["mac"], run["ipv4"], run["channel_id"], deposit, ack, settled, owed,
                   measured_owed, measured_bytes, run["payments"], run["browsed"], lost, tuple(problems))


def summary(report: SoakReport) -> str:
    """A few lines for a test's failure message or the bench log."""
    lines = [json.dumps(report.figures, sort_keys=True)]
    lines += report.problems[:20]
    errs = [e for r in report.runs for e in r["transient_errors"] + r["browse_errors"]][:10]
    if errs:
        lines.append("errors (first 10): " + "; ".join(errs))
    owed = [o.owed for o in report.outcomes if o.owed is not None]
    if owed:
        lines.append(f"owed per client: min {min(owed)}, median {statistics.median(owed)}, max {max(owed)} sat")
    return "\n".join(lines)


if __name__ == "__main__":
    drive(Path(sys.argv[1]), Path(sys.argv[2]))
