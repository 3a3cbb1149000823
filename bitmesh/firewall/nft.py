"""The I/O edge: the `nft` command. `nft -f -` for atomic loads, `nft -j list ...` for reads.

No libnftables binding (none is packaged for OpenWrt). Each call is one process; callers batch.
`argv` lets tests and the bench run nft inside a network namespace (`ip netns exec NS nft`).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence

from bitmesh.firewall.ruleset import FirewallError

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from typing import Any


class Nft:
    def __init__(self, argv: Sequence[str] = ("nft",), timeout: float = 15.0):
        self.argv = tuple(argv)
        self.timeout = timeout

    def _run(self, args: Sequence[str], stdin: str | None = None) -> str:
        return self._run_bytes(args, None if stdin is None else stdin.encode()).decode()

    def _run_bytes(self, args: Sequence[str], stdin: bytes | None = None) -> bytes:
        cmd = [*self.argv, *args]
        try:
            p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FirewallError(f"{' '.join(cmd)}: {e}") from e
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace").strip()[:2000]
            raise FirewallError(f"{' '.join(cmd)} failed ({p.returncode}): {err}")
        return p.stdout

    def load(self, text: str) -> None:
        """Apply a batch atomically: all of it or (on any error) none of it."""
        self._run(["-f", "-"], stdin=text)

    def check(self, text: str) -> None:
        """Parse and validate against the kernel without committing (`nft -c`)."""
        self._run(["-c", "-f", "-"], stdin=text)

    def list_json(self, *what: str, object_hook: Callable[[dict], Any] | None = None) -> list[dict]:
        """`nft -j list WHAT...` as the list of objects under "nftables" (metainfo dropped).
        `object_hook` (json's) may shrink each object as it is parsed: a whole table with 200
        clients is some 200 kB of JSON, 1.4 MB as plain dicts (the gate's read keeps 0.1 MB)."""
        out = self._run_bytes(["-j", "list", *what])  # bytes: no decoded copy besides json's
        try:
            data = json.loads(out, object_hook=object_hook) if out.strip() else {"nftables": []}
        except ValueError as e:
            raise FirewallError(f"nft returned invalid JSON: {e}") from e
        return [o for o in data.get("nftables", []) if "metainfo" not in o]

    def table_exists(self, family: str, name: str) -> bool:
        for obj in self.list_json("tables", family):
            t = obj.get("table")
            if t and t.get("family") == family and t.get("name") == name:
                return True
        return False
