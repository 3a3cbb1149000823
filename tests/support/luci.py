"""LuCI 24.10 for real: a router's web interface around the real BitMesh service, for Chromium.

Inside an OpenWrt root (tests/support/owrt.py), optionally in the router namespace of a
`Topology`:

- the packages as opkg would unpack them: luci-app-bitmesh and bitmesh (tools/ipk.py), over the
  userland's luci-base and bootstrap theme;
- procd (the service manager, and the `system` object LuCI's header asks for the board), rpcd
  with two real password logins (ADMIN may write, VIEWER may only read), uhttpd serving /www,
  /ubus and LuCI's own ucode dispatcher at /cgi-bin/luci: its login page, menu and view template;
- the service through its own init script under procd (`init("start")`), as a router runs it.

The dispatcher needs two ucode modules OpenWrt builds from C outside the source tarballs
(`lucihttp`, `html`); tests/support/luci_ucode/ has ucode ports of the functions LuCI uses from
them (see each file), staged at /usr/share/ucode where ucode looks for modules.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bitmesh import __version__
from tests.support.bcoin import BcoinNode
from tests.support.coins import NETWORK, key_address, new_key
from tests.support.owrt import Login, OwrtRoot, wait_for
from tools.ipk import bitmesh_package, luci_package

UCODE_MODULES = Path(__file__).resolve().parent / "luci_ucode"
GROUPS = ("luci-base", "luci-app-bitmesh")
# rpcd gives "unauthenticated" (session access, login) to the anonymous session only: a login
# that does not list it cannot even ask which of its groups it may write (LuCI's forms do).
# luci-base-network-status lets the Settings page list the networks (the "Gated network").
READ = ("unauthenticated", "luci-base-network-status", *GROUPS)
ADMIN = Login("admin", "admin-pw", read=READ, write=GROUPS)
VIEWER = Login("viewer", "viewer-pw", read=READ, write=())
CONFIG = "/etc/config/bitmesh"
VIEWS = "/cgi-bin/luci/admin/services/bitmesh"

# A service the regtest node can serve (tests/support/router.py ROUTER_OPTIONS, trimmed).
REGTEST_OPTIONS = {
    "enabled": "1",
    "network": NETWORK,
    "chain_backend": "core",
    "core_rpc_user": "x",
    "price_sat_per_mb": "1000",
    "price_sat_per_minute": "0",
    "prepay_step_sat": "500",
    "min_deposit_sat": "2000",
    "max_deposit_sat": "1000000",
    "zero_conf_max_sat": "1000000",
    "expiry_blocks": "40",
    "settle_margin_blocks": "5",
}


def uci_text(options: dict[str, object], lists: dict[str, list[str]] | None = None) -> str:
    """A `config bitmesh 'main'` section as uci writes it."""
    lines = ["config bitmesh 'main'"]
    lines += [f"\toption {name} '{value}'" for name, value in options.items()]
    lines += [f"\tlist {name} '{v}'" for name, values in (lists or {}).items() for v in values]
    return "\n".join(lines) + "\n"


def regtest_options(node: BcoinNode, interface: str, **over: object) -> dict[str, object]:
    """Options of a service on the session's regtest node, reached at the same port inside."""
    return {
        **REGTEST_OPTIONS,
        "interface": interface,
        "core_rpc_url": f"http://127.0.0.1:{node.rpc_port}/",
        "core_rpc_password": node.api_key,
        "payout_address": key_address(new_key()),
        **{k: str(v) for k, v in over.items()},
    }


def uci_options(text: str) -> dict[str, str | list[str]]:
    """The options of /etc/config/bitmesh as uci writes them (`option x 'v'`, `list x 'v'`)."""
    out: dict[str, str | list[str]] = {}
    for m in re.finditer(r"^\s*(option|list)\s+(\w+)\s+'((?:[^']|'\\'')*)'\s*$", text, re.M):
        kind, name, value = m.group(1), m.group(2), m.group(3).replace("'\\''", "'")
        if kind == "list":
            out.setdefault(name, [])
            out[name].append(value)  # type: ignore[union-attr]
        else:
            out[name] = value
    return out


@dataclass
class LuciRouter:
    """The running stack: `url` is LuCI's (uhttpd on loopback inside the root's namespace)."""

    root: OwrtRoot
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def view_url(self, view: str) -> str:
        return f"{self.url}{VIEWS}/{view}"

    # --- the config --------------------------------------------------------------------------

    def config(self) -> dict[str, str | list[str]]:
        return uci_options(self.root.host_path(CONFIG).read_text())

    def write_config(self, text: str) -> None:
        """Replace /etc/config/bitmesh (as an owner editing it by hand would)."""
        path = self.root.host_path(CONFIG)
        path.write_text(text)
        path.chmod(0o600)

    # --- the service -------------------------------------------------------------------------

    def init(self, action: str) -> subprocess.CompletedProcess:
        """`/etc/init.d/bitmesh ACTION`, the package's init script run by OpenWrt's rc.common."""
        return self.root.run(["/etc/init.d/bitmesh", action], text=True, timeout=60)

    def ubus(self, method: str, **args) -> dict | None:
        """`ubus call bitmesh METHOD`: the answer, or None when the object is not there."""
        p = self.root.ubus("call", "bitmesh", method, json.dumps(args))
        return json.loads(p.stdout) if p.returncode == 0 else None

    def instance_pid(self) -> int | None:
        """The pid procd runs the service as, or None when its instance is not running."""
        p = self.root.ubus("call", "service", "list", json.dumps({"name": "bitmesh"}))
        if p.returncode != 0 or not p.stdout.strip():
            return None
        instance = json.loads(p.stdout).get("bitmesh", {}).get("instances", {}).get("bitmesh", {})
        return instance.get("pid") if instance.get("running") else None

    def wait_serving(self, timeout: float = 30.0) -> dict:
        """Until `ubus call bitmesh status` answers and LuCI's object (`luci.bitmesh`, registered
        right after it) is there too; the status answer."""
        try:
            wait_for(lambda: "luci.bitmesh" in self.root.ubus("list").stdout.split(), timeout,
                     "the luci.bitmesh ubus object", interval=0.2)
            return wait_for(lambda: self.ubus("status"), timeout, "the bitmesh ubus object", interval=0.2)
        except TimeoutError:
            raise AssertionError(f"the service did not come up:\n{self.root.logread()[-3000:]}") from None

    def wait_gone(self, timeout: float = 30.0) -> None:
        wait_for(lambda: "bitmesh" not in self.root.ubus("list").stdout.split(), timeout,
                 "the bitmesh ubus object to go", interval=0.2)


def stage_luci(root: OwrtRoot, config: str | None = None) -> None:
    """Put the packages and LuCI's missing ucode modules into a root that has not started."""
    for module in UCODE_MODULES.glob("*.uc"):
        root.stage(f"/usr/share/ucode/{module.name}", module.read_text())
    root.install_package(bitmesh_package(__version__).files)
    root.install_package(luci_package(__version__).files)
    if config is not None:
        root.stage(CONFIG, config, 0o600)


@contextlib.contextmanager
def luci_router(workdir: Path, port: int, netns: str | None = None, config: str | None = None) -> Iterator[LuciRouter]:
    """The stack (module docstring) with /etc/config/bitmesh as shipped, or `config`."""
    root = OwrtRoot(workdir, netns)
    stage_luci(root, config)
    with root:
        root.start_procd()
        root.start_rpcd([ADMIN, VIEWER])
        root.start_uhttpd(port, luci=True)
        yield LuciRouter(root, port)
