"""The bitmesh package on a router run by OpenWrt's procd: the files of the bitmesh and
luci-app-bitmesh packages (tools/ipk.py, as opkg unpacks them) in an OpenWrt root
(tests/support/owrt.py) inside the router namespace of a `Topology`, with ubusd, procd, syslogd,
rpcd and uhttpd. The init script runs as shipped: `/etc/init.d/bitmesh`, `/usr/bin/bitmesh` ->
this venv's python with the installed package.

Config changes go the way LuCI's Save & Apply sends them: a login to rpcd through uhttpd's
/ubus, `uci set`, `uci apply` (rpcd commits and sends procd the `config.change` event), `uci
confirm`; procd's trigger then runs `/etc/init.d/bitmesh reload` after its 1 s delay.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from tests.support.bcoin import BcoinNode
from tests.support.netns import Host, Topology, in_netns
from tests.support.owrt import Login, OwrtRoot, UbusHttp, wait_for
from tests.support.router import ROUTER_OPTIONS, uci_config
from tools.ipk import bitmesh_package, bitmesh_version, luci_package

PASSWORD = "router-admin-pw"


def router_options(topo: Topology, node: BcoinNode, payout_address: str, **options) -> dict[str, object]:
    """`bitmesh.main` of a test router: the LAN bridge, bcoin's RPC (bridged into the router
    namespace at the same port), the journal under /etc/bitmesh."""
    return {
        **ROUTER_OPTIONS,
        "interface": topo.LAN,
        "core_rpc_url": f"http://127.0.0.1:{node.rpc_port}/",
        "core_rpc_password": node.api_key,
        "payout_address": payout_address,
        "state_dir": "/etc/bitmesh",
        **options,
    }


@dataclass
class ProcdRouter:
    topo: Topology
    root: OwrtRoot
    http_port: int  # uhttpd on the router's 127.0.0.1

    @classmethod
    def start(cls, topo: Topology, workdir: Path, options: dict[str, object], http_port: int) -> ProcdRouter:
        root = OwrtRoot(workdir, netns=topo.router.ns)
        for package in (bitmesh_package(bitmesh_version()), luci_package(bitmesh_version())):
            root.install_package(package.files)  # luci-app-bitmesh: the rpcd ACL that lets LuCI write uci bitmesh
        root.stage("/etc/config/bitmesh", uci_config(options), 0o600)
        root.start()
        try:
            root.start_procd()
            root.start_rpcd([Login("root", PASSWORD)])
            root.start_uhttpd(http_port)
            router = cls(topo, root, http_port)
            # what the package's postinst does on a live system
            for action in ("enable", "start"):
                router.init(action)
        except BaseException:
            root.stop()
            raise
        return router

    def stop(self) -> None:
        self.root.stop()

    # --- the owner's side ------------------------------------------------------------------

    def init(self, action: str) -> str:
        """`/etc/init.d/bitmesh ACTION` inside the router, as the owner types it."""
        p = self.root.run(["/etc/init.d/bitmesh", action], text=True)
        assert p.returncode == 0, f"/etc/init.d/bitmesh {action}: {p.stdout}{p.stderr}"
        return p.stdout + p.stderr

    def luci_apply(self, **values: object) -> None:
        """LuCI's Save & Apply of `bitmesh.main` options through uhttpd and rpcd."""
        with in_netns(self.topo.router.ns):
            http = UbusHttp(f"http://127.0.0.1:{self.http_port}").login("root", PASSWORD)
            calls = [
                ("set", {"config": "bitmesh", "section": "main", "values": {k: str(v) for k, v in values.items()}}),
                ("apply", {"rollback": True, "timeout": 30}),
                ("confirm", {}),
            ]
            for method, args in calls:
                status, reply = http.call("uci", method, **args)
                assert status == 0, f"uci {method}: ubus status {status} {reply}"

    def uci(self, *args: str) -> str:
        p = self.root.run(["uci", *args], text=True)
        assert p.returncode == 0, f"uci {args}: {p.stderr}"
        return p.stdout.strip()

    # --- what procd says -------------------------------------------------------------------

    def service(self) -> dict | None:
        """procd's record of the service (`ubus call service list`), None if not registered."""
        p = self.root.ubus("call", "service", "list", json.dumps({"name": "bitmesh", "verbose": True}))
        return json.loads(p.stdout or "{}").get("bitmesh") if p.returncode == 0 else None

    def instance(self) -> dict | None:
        service = self.service() or {}
        return service.get("instances", {}).get("bitmesh")

    def pid(self) -> int | None:
        inst = self.instance()
        return int(inst["pid"]) if inst and inst.get("running") else None

    def has_reload_trigger(self) -> bool:
        triggers = (self.service() or {}).get("triggers", [])
        return any(t[0] == "config.change" and "bitmesh" in json.dumps(t) for t in triggers)

    # --- waiting -----------------------------------------------------------------------------

    def portal(self, client: Host, port: int, path: str = "/api/offer", timeout: float = 2.0) -> dict:
        return self.topo.call(client.ns, "http_get", f"http://{self.topo.router.ipv4}:{port}{path}",
                              timeout=timeout)

    def wait_serving(self, port: int, not_pid: int | None = None, timeout: float = 30.0) -> int:
        """The pid of a running instance (another than `not_pid`) whose portal answers on `port`."""
        client = self.topo.clients[-1]

        def up() -> int | None:
            pid = self.pid()
            if pid is None or pid == not_pid:
                return None
            return pid if self.portal(client, port, timeout=1)["ok"] else None

        try:
            return wait_for(up, timeout, f"bitmesh serving on port {port}", interval=0.2)
        except TimeoutError:
            raise AssertionError(f"not serving on {port}; procd: {self.instance()}\n{self.logread()[-3000:]}") from None

    def wait_no_instance(self, timeout: float = 15.0) -> None:
        """No instance left and its process gone (its SIGTERM handler removed the table)."""
        wait_for(lambda: self.instance() is None, timeout, "the instance removed", interval=0.1)
        wait_for(lambda: not self.bitmesh_processes(), timeout, "the service process gone", interval=0.1)

    def bitmesh_processes(self) -> list[int]:
        out = []
        for pid in self.root.pids():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if any(part.endswith(b"/usr/bin/bitmesh") for part in cmd) and b"serve" in cmd:
                    out.append(pid)
        return out

    def logread(self) -> str:
        return self.root.logread()

    def wait_log(self, text: str, timeout: float = 15.0, after: int = 0) -> str:
        """The first syslog line (from offset `after` of logread) that contains `text`."""
        def find() -> str | None:
            for line in self.logread()[after:].splitlines():
                if text in line:
                    return line
            return None

        try:
            return wait_for(find, timeout, f"{text!r} in logread", interval=0.1)
        except TimeoutError:
            raise AssertionError(f"{text!r} not in logread:\n{self.logread()[-3000:]}") from None

