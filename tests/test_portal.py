"""The portal's captive-portal surface: session, RFC 8908 API, OS probes, redirects, ownership."""

from __future__ import annotations

import http.client
import json

import pytest

from bitmesh.portal.client import PortalClient, PortalError
from tests.support.hotspot import Hotspot, confirmed_tx

pytestmark = pytest.mark.regtest

PROBES = {
    "/generate_204": (204, ""),
    "/hotspot-detect.html": (200, "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>"),
    "/connecttest.txt": (200, "Microsoft Connect Test"),
    "/ncsi.txt": (200, "Microsoft NCSI"),
    "/success.txt": (200, "success\n"),
}


def _get(hotspot: Hotspot, path: str, host: str = "connectivitycheck.gstatic.com", source: str = "127.0.0.1"):
    conn = http.client.HTTPConnection("127.0.0.1", hotspot.http.port, timeout=10, source_address=(source, 0))
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


@pytest.mark.parametrize("path", sorted(PROBES))
def test_os_probes_are_captive_until_paid_and_online_after(hotspot: Hotspot, path):
    status, headers, _ = _get(hotspot, path)
    assert status == 302 and headers["Location"] == "http://connectivitycheck.gstatic.com/"
    payer = hotspot.funded_payer(40_000)
    status, _, _ = _get(hotspot, path)
    assert status == 302  # funded is not paid: nothing bought yet
    payer.pay_exact(1_000)
    assert _get(hotspot, path)[::2] == PROBES[path]


def test_any_other_url_of_an_unpaid_client_goes_to_the_splash_page(hotspot: Hotspot):
    status, headers, _ = _get(hotspot, "/some/page?q=1", host="example.com")
    assert status == 302 and headers["Location"] == "http://example.com/"
    status, headers, body = _get(hotspot, "/api/nothing-here")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_captive_api_rfc8908(hotspot: Hotspot):
    status, headers, body = _get(hotspot, "/api/captive", host=f"127.0.0.1:{hotspot.http.port}")
    assert status == 200 and headers["Content-Type"] == "application/captive+json"
    assert json.loads(body) == {"captive": True, "user-portal-url": f"http://127.0.0.1:{hotspot.http.port}/",
                                "can-extend-session": True}
    payer = hotspot.funded_payer(40_000)
    payer.pay_exact(3_000)
    captive = json.loads(_get(hotspot, "/api/captive")[2])
    assert captive["captive"] is False
    # No gate here (as with `bitmesh serve --no-firewall`): nothing is measured, so nothing is said
    # to remain; tests/test_billing_netns.py reads bytes-remaining off the kernel's meter.
    assert "bytes-remaining" not in captive and "seconds-remaining" not in captive


def test_session_follows_the_callers_channel(hotspot: Hotspot):
    assert hotspot.portal.session()["state"] == "unpaid"
    payer = hotspot.funded_payer(40_000)
    assert hotspot.portal.session()["state"] == "unpaid"
    payer.pay_exact(2_000)
    session = hotspot.portal.session()
    assert session["state"] == "open" and session["channel_id"] == payer.channel_id
    # no meter (no gate): everything paid is owed
    assert (session["paid"], session["owed"], session["credit"], session["deposit"]) == (2_000, 2_000, 0, 40_000)
    assert session["prepay_step_sat"] == hotspot.policy.prepay_step_sat
    payer.close()
    assert hotspot.portal.session()["state"] == "closed"


def test_only_the_bound_client_may_close_its_channel(hotspot: Hotspot):
    payer = hotspot.funded_payer(40_000)
    payer.pay_exact(2_000)
    conn = http.client.HTTPConnection("127.0.0.1", hotspot.http.port, timeout=10, source_address=("127.0.0.2", 0))
    conn.request("POST", f"/api/channels/{payer.channel_id}/close", body=b"{}",
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 403 and json.loads(resp.read())["error"]["code"] == "not_your_channel"
    assert hotspot.portal.channel(payer.channel_id)["state"] == "open"
    assert payer.close()["state"] == "settling"


def test_offer_carries_tariff_tip_metering_and_fee_policy(hotspot: Hotspot):
    offer = hotspot.portal.offer()
    assert offer["tariff"] == {"sat_per_mb": 10, "sat_per_minute": 0}
    assert offer["tip_height"] == hotspot.node.height()
    assert offer["network"] == "regtest-bcoin" and offer["protocol"] == 1
    assert offer["metered"] is False  # no gate, as with `bitmesh serve --no-firewall`
    assert offer["fee_policy"] == {"paid_from": "owner_share", "client_max_sat": 545}


def test_without_a_meter_every_answer_states_owed_equal_paid_and_the_settlement_charges_it(hotspot: Hotspot):
    """No gate (`--no-firewall`): the session, the channel object, the payment answer and the
    close all state owed = paid, and the settlement on the node charges exactly that."""
    payer = hotspot.funded_payer(40_000)
    assert hotspot.portal.channel(payer.channel_id)["owed"] == 0  # nothing paid yet
    answer = payer.pay_exact(3_000)
    assert (answer["paid"], answer["owed"], answer["credit"]) == (3_000, 3_000, 0)
    assert hotspot.portal.session()["owed"] == hotspot.portal.channel(payer.channel_id)["owed"] == 3_000
    closed = payer.close()
    assert (closed["state"], closed["owed"]) == ("settling", 3_000)
    assert hotspot.portal.channel(payer.channel_id)["owed"] == 3_000
    hotspot.mine(1)
    tx = confirmed_tx(hotspot.node, closed["settlement_txid"])
    refund = bytes.fromhex(closed["refund_script"])
    outs = [(o.nValue, bytes(o.scriptPubKey)) for o in tx.vout]
    fee = 40_000 - sum(v for v, _ in outs)
    assert outs[0] == (37_000, refund)  # the change as signed
    assert [v for v, script in outs[1:] if script != refund] == [3_000 - fee]  # all owed to the owner, less the fee
    assert all(script != refund for _, script in outs[1:])  # nothing of what was paid comes back


@pytest.mark.parametrize("answer", [
    b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n",  # killed before the body
    b"HTTP/1.0 200 OK\r\nContent-Length: 40\r\n\r\n{\"state\": \"op",  # killed mid-body
    b"HTTP/1.0 200 OK\r\n\r\n[1, 2]",  # not an object
])
def test_an_answer_cut_off_is_a_retryable_transport_error(answer):
    """A router killed while answering (procd then respawns it): the payer gets a 5xx-class
    PortalError it retries, not a crash."""
    import socket
    import threading

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def answer_once():
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

        threading.Thread(target=answer_once, daemon=True).start()
        with pytest.raises(PortalError) as e:
            PortalClient(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=5).session()
    assert e.value.code == "portal_answer_cut" and e.value.http_status >= 500

