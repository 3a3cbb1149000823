"""The portal's captive-portal surface: session, RFC 8908 API, OS probes, redirects, ownership
(the caller is its socket's peer, never a header; a channel is acted on with its key's proof)."""

from __future__ import annotations

import http.client
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from bitcoin.wallet import CKey

from bitmesh.channel import wire
from bitmesh.paycli import save_channel
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


def _get(hotspot: Hotspot, path: str, host: str = "connectivitycheck.gstatic.com", source: str = "127.0.0.1",
         headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", hotspot.http.port, timeout=10, source_address=(source, 0))
    conn.request("GET", path, headers={"Host": host, **(headers or {})})
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


PUBLIC = {"state", "bytes_remaining", "seconds_remaining"}


def test_session_follows_the_callers_channel(hotspot: Hotspot):
    """By address, the device's public state only; the channel's session with its key's proof."""
    assert hotspot.portal.session() == {"state": "unpaid", "bytes_remaining": None, "seconds_remaining": None}
    payer = hotspot.funded_payer(40_000)
    assert hotspot.portal.session()["state"] == "unpaid"
    payer.pay_exact(2_000)
    public = hotspot.portal.session()
    assert set(public) == PUBLIC and public["state"] == "open"  # no channel, money or usage by address
    session = payer.session()
    assert session["state"] == "open" and session["channel_id"] == payer.channel_id
    # no meter (no gate): everything paid is owed
    assert (session["paid"], session["owed"], session["credit"], session["deposit"]) == (2_000, 2_000, 0, 40_000)
    assert session["prepay_step_sat"] == hotspot.policy.prepay_step_sat
    assert session["concurrent_use"] is None  # no grants here, so nothing to copy
    payer.close()
    assert hotspot.portal.session()["state"] == "closed"
    assert payer.session()["channel_state"] == "settling"


def _post(hotspot: Hotspot, path: str, body: dict, source: str = "127.0.0.1", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", hotspot.http.port, timeout=10, source_address=(source, 0))
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    return resp.status, answer


def test_closing_a_channel_takes_its_keys_proof_not_its_address(hotspot: Hotspot):
    """From the channel's own address, no proof, another key's proof, a proof for another channel
    or for reading the session: refused, nothing changes. Its key's close proof from anywhere: closed."""
    payer = hotspot.funded_payer(40_000)
    payer.pay_exact(2_000)
    other = hotspot.funded_payer(30_000)
    path = f"/api/channels/{payer.channel_id}/close"
    stranger = CKey(bytes(range(1, 33)), compressed=True)
    refusals = [
        ({}, "proof_missing"),
        ({"proof": ""}, "proof_missing"),
        ({"proof": "zz"}, "proof_invalid"),
        ({"proof": 7}, "proof_invalid"),
        ({"proof": "30" * 200}, "proof_invalid"),
        ({"proof": wire.sign_proof(stranger, "close", payer.channel_id)}, "proof_invalid"),
        ({"proof": other.proof("close")}, "proof_invalid"),  # another channel's (a real key, a real proof)
        ({"proof": payer.proof("session")}, "proof_invalid"),  # reading is not closing
    ]
    for body, code in refusals:
        status, answer = _post(hotspot, path, body)  # the channel's own address: it counts for nothing
        assert (status, answer["error"]["code"]) == (403, code), body
    assert hotspot.portal.channel(payer.channel_id)["state"] == "open"
    # a header naming the channel's address changes nothing either
    status, answer = _post(hotspot, path, {}, source="127.0.0.2", headers={"X-Forwarded-For": "127.0.0.1"})
    assert (status, answer["error"]["code"]) == (403, "proof_missing")
    assert hotspot.portal.channel(payer.channel_id)["state"] == "open"
    # the proof is what counts: from another address (a payer whose DHCP lease changed) it closes
    status, closed = _post(hotspot, path, {"proof": payer.proof("close")}, source="127.0.0.2")
    assert status == 200 and closed["state"] == "settling" and closed["settlement_txid"]
    assert hotspot.portal.channel(other.channel_id)["state"] == "open"


def test_reading_a_session_takes_its_keys_proof(hotspot: Hotspot):
    payer = hotspot.funded_payer(40_000)
    payer.pay_exact(2_000)
    cid = payer.channel_id
    stranger = CKey(bytes(range(1, 33)), compressed=True)
    for query, status, code in [
        (f"channel_id={cid}", 403, "proof_missing"),
        (f"channel_id={cid}&proof=", 403, "proof_missing"),
        (f"channel_id={cid}&proof={wire.sign_proof(stranger, 'session', cid)}", 403, "proof_invalid"),
        (f"channel_id={cid}&proof={payer.proof('close')}", 403, "proof_invalid"),  # a close proof reads nothing
        (f"proof={payer.proof('session')}", 400, "field_missing"),
        (f"channel_id={'00' * 16}&proof={payer.proof('session')}", 404, "channel_unknown"),
    ]:
        got, _, body = _get(hotspot, f"/api/session?{query}", source="127.0.0.2")
        assert (got, json.loads(body)["error"]["code"]) == (status, code), query
    # the right proof answers from any address
    got, _, body = _get(hotspot, f"/api/session?channel_id={cid}&proof={payer.proof('session')}", source="127.0.0.2")
    assert got == 200 and json.loads(body)["channel_id"] == cid and json.loads(body)["paid"] == 2_000


def test_bitmesh_close_settles_a_channel_from_its_saved_key(hotspot: Hotspot, tmp_path: Path):
    """`bitmesh pay --no-close` leaves the channel's key in its channel file (mode 0600);
    `bitmesh close --channel-file` proves the channel with it and settles it."""
    payer = hotspot.funded_payer(40_000)
    payer.pay_exact(3_000)
    path = tmp_path / "channel.json"
    save_channel(path, payer.record())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["client_secret"] == payer.client_secret.hex()
    run = subprocess.run([sys.executable, "-m", "bitmesh.cli", "close", "--channel-file", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    channel = hotspot.portal.channel(payer.channel_id)
    assert channel["state"] == "settling" and channel["settlement_txid"] in run.stdout


def test_a_forwarded_for_header_is_not_the_caller(hotspot: Hotspot):
    """The caller is the socket's peer: another device (127.0.0.2) naming a paid client's address
    in X-Forwarded-For (bottle's remote-address helper believed it) sees its own, captive state."""
    payer = hotspot.funded_payer(40_000)
    payer.pay_exact(2_000)
    spoof = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Forwarded": "for=127.0.0.1"}
    assert json.loads(_get(hotspot, "/api/session")[2])["state"] == "open"  # the paid client itself
    status, _, body = _get(hotspot, "/api/session", source="127.0.0.2", headers=spoof)
    assert status == 200 and json.loads(body) == {"state": "unpaid", "bytes_remaining": None,
                                                  "seconds_remaining": None}
    assert json.loads(_get(hotspot, "/api/captive", source="127.0.0.2", headers=spoof)[2])["captive"] is True
    status, headers, _ = _get(hotspot, "/generate_204", source="127.0.0.2", headers=spoof)
    assert status == 302  # captive: the probe goes to the portal
    assert _get(hotspot, "/generate_204")[0] == 204


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
    assert payer.session()["owed"] == hotspot.portal.channel(payer.channel_id)["owed"] == 3_000
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

