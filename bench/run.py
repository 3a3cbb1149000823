"""Runs every bench, writes bench/results.json and prints a table.

Each section measures its figures side by side in one run (these machines are noisy); a
section that cannot run here records why instead of a number.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path

SECTIONS = ("bench.channel", "bench.firewall", "bench.portal", "bench.faults", "bench.fuzz", "bench.dns",
            "bench.garden", "bench.gate", "bench.soak", "bench.mqtt", "bench.resale", "bench.packages")
TARGETS = {  # key: (comparison, target) from the issues
    "channel.updates_per_s": (">=", 500),
    "channel.updates_to_verify_ratio": (">=", 0.4),
    "firewall.forward_throughput_ratio": (">=", 0.95),
    "firewall.quota_overshoot_bytes": ("<=", 1500),
    "portal.pay_to_access_ms": ("<=", 100),
    "portal.p99_ms_50_clients": ("<=", 50),
    "faults.lost_sat": ("<=", 0),
    "portal.p99_ratio_to_uhttpd": ("<=", 1.5),
    "fuzz.requests": (">=", 10_000),
    "fuzz.server_errors": ("<=", 0),
    "dns.unpaid_tunnel_bytes_per_s": ("<=", 2000),
    "firewall.forward_throughput_ratio_no_fw4": (">=", 0.95),
    "garden.bytes_per_s_per_device": ("<=", 72089),  # garden.limit_bytes_per_s (64 KiB/s) + 10 %
    "soak.clients": (">=", 200),
    "soak.lost_sat": ("<=", 0),
    "service.rss_mb_200_clients": ("<=", 30),
    "mqtt.events_per_s": (">=", 1000),
    "mqtt.offer_propagation_ms": ("<=", 50),
    "resale.pay_to_access_ms": ("<=", 200),
    "packages.installed_kb": ("<=", 2048),
}


def _meets(key: str, value) -> str:
    if key not in TARGETS or not isinstance(value, int | float):
        return ""
    op, target = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"{'ok' if ok else 'MISS'} ({op} {target})"


def main(argv: list[str]) -> int:
    """`python -m bench.run` runs every section; `python -m bench.run soak gate` runs those only and
    keeps the other figures of bench/results.json (meta.sections says when each section ran)."""
    out = Path(__file__).with_name("results.json")
    chosen = [f"bench.{a.removeprefix('bench.')}" for a in argv]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"no such section: {', '.join(sorted(unknown))} (sections: {', '.join(SECTIONS)})")
    results: dict[str, object] = json.loads(out.read_text()) if chosen and out.exists() else {}
    ran: dict[str, str] = dict(results.get("meta", {}).get("sections", {})) if chosen else {}
    for name in chosen or SECTIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # that part of the product is not built yet
        started = time.perf_counter()
        results.update(module.run())
        results[f"{name.split('.')[1]}.bench_seconds"] = round(time.perf_counter() - started, 1)
        ran[name.split(".")[1]] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["meta"] = {"python": platform.python_version(), "machine": platform.machine(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sections": ran}
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    width = max(len(k) for k in results)
    print(f"{'figure':<{width}}  {'value':>12}  target")
    for key, value in sorted(results.items()):
        if key != "meta":
            print(f"{key:<{width}}  {value!s:>12}  {_meets(key, value)}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
