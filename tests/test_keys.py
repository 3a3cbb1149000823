"""The seed: created on a first start only; missing or wrong with channels on record, the service
refuses to start and says why; a key that is not the channel's is never signed with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitmesh.channel.contract import Outpoint
from bitmesh.channel.keys import ChannelKeychain, load_or_create_seed
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.state import Channel, Phase
from bitmesh.config import load_settings
from bitmesh.errors import ConfigError
from bitmesh.portal.client import PortalError
from bitmesh.service import build_service
from tests.support.bcoin import free_port
from tests.support.coins import NETWORK, key_address, new_key
from tests.support.hotspot import Hotspot, confirmed_tx
from tests.support.router import uci_config

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, state: Path) -> Path:
    path = tmp_path / "config" / "bitmesh"
    path.parent.mkdir(exist_ok=True)
    path.write_text(uci_config({"enabled": 1, "network": NETWORK, "chain_backend": "esplora",
                                "esplora_url": "http://127.0.0.1:9/api", "payout_address": key_address(new_key()),
                                "state_dir": state}))
    return path


def _serve(config: Path, port: int) -> subprocess.CompletedProcess:
    """`bitmesh serve` as procd runs it; one that starts is stopped after 10 s (and fails the test)."""
    argv = [sys.executable, "-m", "bitmesh.cli", "serve", "--config", str(config), "--no-firewall", "--no-ubus",
            "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"the service started instead of refusing: {err[-1500:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _open_channel(keychain: ChannelKeychain, index: int) -> Channel:
    return Channel(id=f"c{index}", key_index=index, client_pubkey=bytes(new_key().pub),
                   server_pubkey=bytes(keychain.key(index).pub), deposit=50_000, expiry=2000,
                   refund_script=b"\x00\x14" + bytes(20), created_at=1, phase=Phase.OPEN,
                   funding=Outpoint("ab" * 32, 0))


def _journal_with(state: Path, *channels: Channel) -> None:
    ledger = Ledger(state / "channels.journal")
    ledger.load()
    for ch in channels:
        ledger.put(ch)
    ledger.close()


def test_missing_seed_with_channels_on_record_stops_the_start(tmp_path):
    state = tmp_path / "state"
    keychain = ChannelKeychain(load_or_create_seed(state / "seed"))
    _journal_with(state, _open_channel(keychain, 0))
    (state / "seed").unlink()  # lost: a wiped overlay, a botched restore
    refused = _serve(_config(tmp_path, state), free_port())
    assert refused.returncode == 2
    assert "bitmesh: seed_missing:" in refused.stderr and "restore the seed" in refused.stderr
    assert not (state / "seed").exists()  # never silently replaced


def test_missing_seed_with_only_an_archive_stops_the_start(tmp_path):
    state = tmp_path / "state"
    keychain = ChannelKeychain(load_or_create_seed(state / "seed"))
    ledger = Ledger(state / "channels.journal", compact_bytes=1024)
    ledger.load()
    for i in range(3):  # settled channels, archived by the compactions
        ledger.put(_open_channel(keychain, i).evolve(phase=Phase.SETTLED, paid=1_000, payment_sig=b"\x01" * 72))
    ledger.close()
    assert (state / "channels.archive").stat().st_size > 0
    (state / "seed").unlink()
    (state / "channels.journal").unlink()
    refused = _serve(_config(tmp_path, state), free_port())
    assert refused.returncode == 2 and "bitmesh: seed_missing:" in refused.stderr
    assert not (state / "seed").exists()


def test_a_first_start_creates_the_seed_and_a_restart_keeps_it(tmp_path):
    state = tmp_path / "state"
    config = _config(tmp_path, state)
    service = build_service(load_settings(config), listen=[("127.0.0.1", free_port())], firewall=False)
    service.manager.ledger.close()
    seed = (state / "seed").read_text()
    assert len(bytes.fromhex(seed.strip())) == 32 and (state / "seed").stat().st_mode & 0o777 == 0o600
    service = build_service(load_settings(config), listen=[("127.0.0.1", free_port())], firewall=False)
    service.manager.ledger.close()
    assert (state / "seed").read_text() == seed


def test_seed_loading_without_create_refuses_a_missing_seed(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load_or_create_seed(tmp_path / "seed", create=False)
    assert refused.value.code == "seed_missing"
    assert not (tmp_path / "seed").exists()


def test_a_wrong_seed_stops_the_start(tmp_path):
    state = tmp_path / "state"
    keychain = ChannelKeychain(load_or_create_seed(state / "seed"))
    _journal_with(state, _open_channel(keychain, 0), _open_channel(keychain, 1))
    (state / "seed").write_text(os.urandom(32).hex() + "\n")  # another router's seed restored by mistake
    refused = _serve(_config(tmp_path, state), free_port())
    assert refused.returncode == 2 and "bitmesh: seed_mismatch:" in refused.stderr


@pytest.mark.regtest
def test_a_key_that_is_not_the_channels_is_never_signed_with(hotspot: Hotspot):
    payer = hotspot.funded_payer(60_000)
    payer.pay_exact(7_000)
    channel = hotspot.manager.get(payer.channel_id or "")
    right = hotspot.manager.keychain
    hotspot.manager.keychain = ChannelKeychain(os.urandom(32))  # the seed changed under the running service
    with pytest.raises(PortalError) as refused:
        payer.close()
    assert refused.value.code == "seed_mismatch"
    assert not hotspot.chain.get_outspend(channel.funding.txid, channel.funding.vout).spent
    assert hotspot.portal.channel(channel.id)["state"] == "open"
    hotspot.manager.keychain = right
    closed = payer.close()
    hotspot.mine(1)
    assert confirmed_tx(hotspot.node, closed["settlement_txid"]).vout[0].nValue == 60_000 - 7_000
