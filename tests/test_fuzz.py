"""A short fuzz of the real portal (the full run, >= 10,000 requests, is bench/fuzz.py in
`make bench`): requests generated from docs/openapi.yaml with hypothesis, a quarter of them
with their framing broken on purpose, against the in-process portal on the regtest node with
every per-client limit on. No 5xx, no crash, no state change on a refused request, every answer
as the description lists it (tests/support/fuzz.py)."""

from __future__ import annotations

import pytest

from tests.support.fuzz import RAW_MUTATIONS, fuzz_rig, load_spec, operations

pytestmark = pytest.mark.regtest

REQUESTS = 400


def test_the_description_names_every_route_the_portal_serves(hotspot):
    """docs/openapi.yaml and the application agree: every route of the app is described (the OS
    probes by one entry) and every described path exists."""
    spec_paths = {op.path for op in operations(load_spec())}
    routes = {r.rule.replace("<channel_id>", "{channel_id}").replace("<path:path>", "{path}")
              for r in hotspot.http.app.routes}
    probes = {"/gen_204", "/hotspot-detect.html", "/library/test/success.html", "/connecttest.txt", "/ncsi.txt",
              "/success.txt", "/canonical.html"}
    routes = {"/{anything}" if r == "/{path}" else r for r in routes} - probes
    assert routes == spec_paths


def test_fuzzed_requests_get_no_server_error_and_refusals_change_nothing(hotspot):
    fuzz = fuzz_rig(hotspot)
    report = fuzz.run(REQUESTS)
    summary = report.summary()
    assert report.requests >= REQUESTS
    assert report.problems == [], summary
    # the run reached both sides: accepted requests and refusals, the app and the server's framing
    assert summary["by_status"].get("200", 0) > 20 and summary["by_status"].get("400", 0) > 20, summary
    assert sum(n for label, n in report.by_label.items() if label.startswith("raw:")) > REQUESTS // 8
    assert {label[4:] for label in report.by_label if label.startswith("raw:")} >= set(RAW_MUTATIONS) - {"garbage"}
