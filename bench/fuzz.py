"""The full fuzz of the portal (the short one is tests/test_fuzz.py in `make test`): requests
generated from docs/openapi.yaml with hypothesis (tests/support/fuzz.py), a quarter of them with
their framing broken on purpose, against the real application and HTTP server (every per-client
limit on, 200 loopback source addresses) on a bcoin regtest node of its own.

fuzz.requests
    Requests sent (at least REQUESTS); each on its own TCP connection.
fuzz.server_errors
    Answers 500 or above (target 0). `fuzz.state_changes` (a refused request that changed a file
    of the state_dir or a channel), `fuzz.spec_violations` (an answer the description does not
    list, or one without a JSON error) and `fuzz.crashed` (the server stopped answering) beside it.
fuzz.requests_per_s
    How fast the run went (the fuzzer, the server and the state checks together).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from tests.support.fuzz import fuzz_rig
from tests.support.hotspot import Hotspot
from tests.support.router import regtest

REQUESTS = 10_000


def run(requests: int = REQUESTS) -> dict:
    with tempfile.TemporaryDirectory(prefix="bitmesh-fuzz-") as tmp, regtest(Path(tmp) / "bcoin") as (node, faucet):
        hotspot = Hotspot.start(node, faucet, Path(tmp) / "state")
        try:
            fuzz = fuzz_rig(hotspot)
            started = time.perf_counter()
            report = fuzz.run(requests)
            seconds = time.perf_counter() - started
        finally:
            hotspot.stop()
    summary = report.summary()
    for kind in ("server_errors", "state_changes", "spec_violations"):
        for example in getattr(report, kind)[:3]:  # what to look at first, if anything
            print(f"fuzz: {kind}: {example!r}"[:1500], file=sys.stderr)
    return {
        "fuzz.requests": report.requests,
        "fuzz.server_errors": summary["server_errors"],
        "fuzz.state_changes": summary["state_changes"],
        "fuzz.spec_violations": summary["spec_violations"],
        "fuzz.crashed": report.dead is not None,
        "fuzz.requests_per_s": round(report.requests / seconds, 1),
        "fuzz.by_status": summary["by_status"],
    }


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else REQUESTS), indent=2))
