"""The I/O edge: the `nft` command. `nft -f -` for atomic loads, `nft -j list ...` for reads.

No libnftables binding (none is packaged for OpenWrt). Each call is one process; callers batch.
`argv` lets tests and the bench run nft inside a network namespace (`ip netns exec NS nft`).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from bitmesh.firewall.ruleset import FirewallError


class Nft:
    def __init__(self, argv: Sequence[str] = ("nft",), timeout: float = 15.0):
        self.argv = tuple(argv)
        self.timeout = timeout

    def _run(self, args: Sequence[str], stdin: str | None = None) -> str:
        cmd = [*self.argv, *args]
        try:
            p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FirewallError(f"{' '.join(cmd)}: {e}") from e
        if p.returncode != 0:
            raise FirewallError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[:2000]}")
        return p.stdout

    def load(self, text: str) -> None:
        """Apply a batch atomically: all of it or (on any error) none of it."""
        self._run(["-f", "-"], stdin=text)

    def check(self, text: str) -> None:
        """Parse and validate against the kernel without committing (`nft -c`)."""
        self._run(["-c", "-f", "-"], stdin=text)

    def list_json(self, *what: str) -> list[dict]:
        """`nft -j list WHAT...` as the list of objects under "nftables" (metainfo dropped)."""
        out = self._run(["-j", "list", *what])
        try:
            data = json.loads(out) if out.strip() else {"nftables": []}
        except ValueError as e:
            raise FirewallError(f"nft returned invalid JSON: {e}") from e
        return [o for o in data.get("nftables", []) if "metainfo" not in o]

    def table_exists(self, family: str, name: str) -> bool:
        for obj in self.list_json("tables", family):
            t = obj.get("table")
            if t and t.get("family") == family and t.get("name") == name:
                return True
        return False
