"""The service's resident memory (issue 10, service.rss_mb_200_clients <= 30): what keeps it low,
checked on the real `bitmesh serve` (firewall on) in the router namespace, without timing or an
RSS threshold (the figures are bench/soak.py's):

- `serve` loads neither `typing` (~0.5 MB) nor the payer's side (`bitmesh pay`/`close`, the
  wallet session, the portal client: about 0.5 MB of code and objects the router never runs);
- on glibc the C allocator runs one arena for all threads (bitmesh/memory.py): with an arena per
  thread (the portal's 18 threads) 200 clients grew the process by some 5 MB more;
- the gate reads the kernel's table (every meter pass) without building it as dicts: each element
  is kept compact as json parses it (200 clients: 0.6 MB parse peak instead of 1.7 MB), with the
  same state, to the byte.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bitmesh.firewall import Nft, gate
from bitmesh.firewall.ruleset import FirewallConfig, PaidClient, render
from tests.support.netns import Topology
from tests.support.router import _WAIT_HTTP, REPO, RouterService, python_in

pytestmark = [
    pytest.mark.netns,
    pytest.mark.regtest,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]

# The service as procd runs it (`python3 -m bitmesh.cli serve ...`), and when it exits, what it
# had loaded and glibc's view of its heaps (malloc_info's XML: one <heap nr=...> per arena).
LAUNCHER = """
import atexit, ctypes, sys
out = sys.argv.pop(1)

def report():
    with open(out + ".modules", "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    fp = libc.fopen((out + ".malloc").encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)

atexit.register(report)
from bitmesh.cli import main
sys.exit(main())
"""

PAYER_MODULES = {"bitmesh.paycli", "bitmesh.paying", "bitmesh.channel.payer", "bitmesh.portal.client"}


def _glibc() -> bool:
    return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.fixture(scope="module")
def served(bcoin, tmp_path_factory) -> tuple[set[str], str]:
    """A real `bitmesh serve` in the router namespace that served a page and was stopped:
    its modules and its malloc_info at exit."""
    workdir = tmp_path_factory.mktemp("memory")
    out = workdir / "report"
    with Topology(n_clients=1) as topo:
        topo.bridge_tcp(topo.router.ns, bcoin.rpc_port, ("127.0.0.1", bcoin.rpc_port))
        service = RouterService(topo, bcoin, workdir / "router")  # its config; started here
        log = service.log.open("ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.router.ns, sys.executable, "-c", LAUNCHER, str(out), "serve",
             "--config", str(service.config), "--watch-interval", "1", "--no-ubus"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            python_in(topo.router.ns, _WAIT_HTTP, f"{service.url}/", "20", timeout=25)
            python_in(topo.router.ns, _WAIT_HTTP, f"{service.url}/api/offer", "5", timeout=10)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            log.close()
    assert proc.returncode == 0, service.log.read_text()[-3000:]
    modules = set(Path(f"{out}.modules").read_text().split())
    return modules, Path(f"{out}.malloc").read_text()


def test_serve_does_not_load_the_payer_side(served) -> None:
    """`bitmesh serve` loads the service (portal, gate, channels) but not `bitmesh pay`'s code;
    the pay and close commands are still there for the command line."""
    modules, _ = served
    assert {"bitmesh.service", "bitmesh.portal.api", "bitmesh.firewall.gate"} <= modules
    assert not PAYER_MODULES & modules, sorted(PAYER_MODULES & modules)
    for command in ("pay", "close"):
        p = subprocess.run([sys.executable, "-m", "bitmesh.cli", command, "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and f"bitmesh {command}" in p.stdout, p.stderr


def test_serve_without_mqtt_loads_no_paho_nor_the_marketplace(served) -> None:
    """MQTT off (the default): neither paho nor bitmesh.market is imported, no thread of theirs."""
    modules, _ = served
    assert "bitmesh.service" in modules
    loaded = sorted(m for m in modules if m.split(".")[0] == "paho" or m.startswith("bitmesh.market"))
    assert not loaded, loaded


def test_serve_does_not_load_typing(served) -> None:
    """`typing` (about 0.5 MB resident with its classes) is only for the type checker: the
    service's modules import its names under a TYPE_CHECKING guard."""
    modules, _ = served
    assert "typing" not in modules


@pytest.mark.skipif(not _glibc(), reason="the arena limit is glibc's (musl has no per-thread arenas)")
def test_serve_runs_one_malloc_arena_for_all_its_threads(served) -> None:
    """The portal's I/O and worker threads, the timer, the nft monitor, the captive DNS and the
    clone watch all allocate from glibc's one main arena: malloc_info lists a single heap
    (untuned, each of those threads gets an arena of its own: up to 8 per CPU)."""
    _, malloc_info = served
    assert malloc_info.startswith("<malloc"), malloc_info[:200]
    assert malloc_info.count("<heap nr=") == 1, malloc_info[:2000]


def _clients(n: int) -> list[PaidClient]:
    """`n` paid devices with IPv4 and IPv6 and distinct counted bytes (carried into the kernel's
    element counters and quotas by the load)."""
    return [PaidClient(f"02:66:00:00:{i // 256:02x}:{i % 256:02x}", ipv4=f"10.66.{i // 200}.{i % 200 + 1}",
                       ipv6=(f"fd66::{i + 0x100:x}",), quota_bytes=10**9, expires_at=None,
                       used_up=1000 + 7 * i, used_down=5000 + 13 * i) for i in range(n)]


def test_the_gate_reads_200_clients_without_the_table_as_dicts(monkeypatch) -> None:
    """The meter's read of a real 200-client table (element counters, quotas, maps) gives the
    same state as a plain parse, every counted byte included, and what reaches parse_state has
    no element as a dict and no rules: they were compacted while json parsed (the listing as
    dicts, 1.4 MB at 200 clients, was the service's biggest allocation burst)."""
    ns = f"bmmem-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        nft = Nft(["ip", "netns", "exec", ns, "nft"])
        config = FirewallConfig(lan_interface="br-mem", router_ipv4="10.66.250.1", router_ipv6="fd66::1",
                                portal_port=2050)
        clients = _clients(200)
        nft.load(render(config, clients, now=0.0))
        g = gate.Gate(config, nft)
        seen: list[list] = []
        plain_parse = gate.parse_state

        def recording(objs):
            seen.append(objs)
            return plain_parse(objs)

        monkeypatch.setattr(gate, "parse_state", recording)
        st = g._read()
        objs = seen[0]
        assert not [o for o in objs if "rule" in o or "chain" in o]
        elements = [e for o in objs for kind in ("set", "map") if kind in o for e in o[kind].get("elem") or []]
        assert len(elements) > 1000 and not [e for e in elements if isinstance(e, dict)], elements[:3]
        assert st == plain_parse(nft.list_json("table", "inet", "bitmesh"))  # the same, uncompacted
        for c in clients:
            assert st.up[(c.mac, c.ipv4)] == c.used_up and st.down[c.ipv4] == c.used_down
            assert st.up[(c.mac, c.ipv6[0])] == 0 and st.quotas[gate.quota_name(c.mac)] == (10**9, c.used)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=True)
