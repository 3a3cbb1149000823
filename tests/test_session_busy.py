"""200 wallets polling their session must not be turned away (issue 10 soak: 503 server_busy).

Two causes were found with py-spy dumps of the real `bitmesh serve` under the 200-client soak:
every session answer took the channel manager's lock (to keep its usage reading), which a
payment holds through its journal fsync and its kernel grant (an nft call), so the workers piled
up behind it; and the portal's queue (64 beyond the 8 workers) was smaller than one poll of every
device, so the pile-up overflowed into 503 server_busy.

- A session answer is a snapshot: it never waits for the manager's lock, and still states the
  kernel's count (real nft, a real gate in a router namespace, a real ChannelManager).
- The portal queues one request of each of 200 devices while every worker is busy (a real
  HttpServer, real sockets): none is refused; a request that waited past the queue's deadline is
  refused unrun (its client may be gone: a payment it never saw acknowledged).
- A payment's kernel grant runs after the manager's lock is released, after its fsync, before
  its answer; the meter grants the channel as it is then (a late grant never lowers a newer one
  nor re-grants a closed channel).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import pytest

from bitmesh.chain import make_backend
from bitmesh.chain.address import p2wpkh_script
from bitmesh.channel.keys import ChannelKeychain, load_or_create_seed
from bitmesh.channel.ledger import Ledger
from bitmesh.channel.manager import ChannelManager
from bitmesh.channel.server import ChannelPolicy
from bitmesh.channel.state import Channel, Phase
from bitmesh.firewall import FirewallConfig, Gate, Nft, PaidClient
from bitmesh.meter import Meter
from bitmesh.portal.httpserver import HttpServer, Limits
from tests.support.coins import NETWORK, new_key
from tests.support.hotspot import TEST_POLICY, Hotspot
from tests.support.netns import Topology

DEVICES = 200
netns = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")


# --- the session answer never waits for the manager's lock ---------------------------------------


@pytest.fixture(scope="module")
def topo():
    with Topology(n_clients=1) as t:
        t.http_server(t.upstream.ns, "UPSTREAM", [8080])
        yield t


@pytest.fixture
def metered(topo, tmp_path):
    """A real ChannelManager holding one open, paid channel of the client's device, and a Meter
    over a real gate (nft in the router namespace) that grants it."""
    client = topo.clients[0]
    policy = ChannelPolicy(network=NETWORK, payout_script=p2wpkh_script(new_key().pub), **TEST_POLICY)
    manager = ChannelManager(policy, Ledger(tmp_path / "channels.journal"),
                             ChannelKeychain(load_or_create_seed(tmp_path / "seed")),
                             make_backend("core", "http://127.0.0.1:9"))  # never asked here
    channel = Channel(id="c" * 32, key_index=0, client_pubkey=new_key().pub, server_pubkey=b"\x03" * 33,
                      deposit=100_000, expiry=2_000, refund_script=b"\x00\x14" + b"\x01" * 20, created_at=1,
                      phase=Phase.OPEN, paid=5_000, sat_per_mb=1_000, sat_per_minute=0, access_started_at=1,
                      client_mac=client.mac.lower(), client_ip=client.ipv4)
    manager._channels[channel.id] = channel  # a channel as a payment leaves it (the journal is not the subject)
    wrapper = tmp_path / "nft"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {topo.router.ns} nft "$@"\n')
    wrapper.chmod(0o755)
    gate = Gate(FirewallConfig(lan_interface=topo.LAN, router_ipv4=topo.router.ipv4, router_ipv6=topo.router.ipv6),
                Nft([str(wrapper)]))
    gate.start([PaidClient(channel.client_mac, ipv4=channel.client_ip, quota_bytes=5_000_000)])
    try:
        yield manager, Meter(manager, gate, neighbours=lambda: []), channel
    finally:
        gate.stop()
        manager.ledger.close()


@netns
def test_a_session_answer_does_not_wait_for_a_payment_holding_the_manager(topo, metered):
    """While another device's payment holds the manager's lock (its fsync, its nft grant), a
    session answer still comes, with the bytes the kernel counted for the device; the manager's
    record is left to the meter's pass (which takes the lock). Old code: the answer waits for the
    lock (here: until the test gives up after 20 s)."""
    manager, meter, channel = metered
    client = topo.clients[0]
    got = topo.call(client.ns, "http_get", f"http://{topo.upstream.ipv4}:8080/", timeout=5)
    assert got["ok"], got
    answers: list = []
    with manager._lock:  # what ChannelManager.pay holds through the journal's fsync and the grant
        reader = threading.Thread(target=lambda: answers.append(meter.session(manager.get(channel.id))), daemon=True)
        reader.start()
        reader.join(timeout=20)
        assert answers, "the session answer waited for the manager's lock"
    session = answers[0]
    assert session.state == "open"
    assert session.channel.bytes_used > 0  # the kernel's count, in the answer
    assert 0 < session.owed <= channel.paid
    assert manager.get(channel.id).bytes_used == 0  # a snapshot: the record is the meter pass's to keep
    meter.tick()
    assert manager.get(channel.id).bytes_used >= session.channel.bytes_used


@netns
def test_a_late_grant_takes_the_channel_as_it_is_now(topo, metered):
    """Payments are published after the manager's lock, so two may reach the meter out of order:
    the older one's grant must not lower the newer quota, and a channel closed meanwhile is not
    granted again."""
    manager, meter, channel = metered
    richer = channel.evolve(paid=8_000)
    manager._channels[channel.id] = richer  # the newer payment, committed
    meter.on_channel(richer, channel)
    quota = meter.gate.clients()[channel.client_mac].quota_bytes
    meter.on_channel(channel.evolve(paid=6_000), channel)  # an older payment's turn comes late
    assert meter.gate.clients()[channel.client_mac].quota_bytes == quota == 8_000_000
    closed = richer.evolve(phase=Phase.SETTLING)
    manager._channels[channel.id] = closed
    meter.on_channel(closed, richer)  # the close revokes
    assert channel.client_mac not in meter.gate.clients()
    meter.on_channel(richer.evolve(paid=9_000), richer)  # a payment published after the close
    assert channel.client_mac not in meter.gate.clients()


def test_a_payment_is_published_on_disk_outside_the_managers_lock(bcoin, faucet, tmp_path):
    """The listeners (the meter's kernel grant) see a payment once it is in the journal, without
    the manager's lock (opens, fundings, closes, the chain watch and other devices' payments go
    on meanwhile), and before the payer has its answer. Old code: called under the lock."""
    hotspot = Hotspot.start(bcoin, faucet, tmp_path)
    seen: list[tuple[int, bool, int]] = []

    def listener(new: Channel, old: Channel | None) -> None:
        if old is not None and new.paid > old.paid:
            on_disk = hotspot.reload_ledger()[new.id].paid
            seen.append((new.paid, hotspot.manager._lock._is_owned(), on_disk))

    try:
        payer = hotspot.funded_payer(30_000)
        hotspot.manager.listeners.append(listener)
        answer = payer.pay_for(0)
    finally:
        hotspot.stop()
    assert seen == [(answer["paid"], False, answer["paid"])]


# --- the portal queues a poll of every device ----------------------------------------------------


def test_the_portal_queues_a_poll_of_every_device_while_the_workers_are_busy():
    """200 devices' session polls arrive while all workers are held (as behind a slow payment):
    each waits its turn and is answered; none gets 503 server_busy. Old sizing (64 waiting
    beyond 8 workers): over a hundred of the 200 are refused."""
    release = threading.Event()
    held = threading.Semaphore(0)

    def app(environ, start_response):
        held.release()
        release.wait(30)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"state":"open"}']

    limits = Limits()
    server = HttpServer(app, [("127.0.0.1", 0)], limits)
    server.start()
    socks = []
    try:
        for _ in range(limits.workers):  # every worker busy
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /api/session HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        for _ in range(limits.workers):
            assert held.acquire(timeout=10)
        for _ in range(DEVICES - limits.workers):  # the other devices' polls, all in the queue
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET /api/session HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        # one more request behind them all: once it is answered, every earlier one was taken in
        probe = socket.create_connection(("127.0.0.1", server.port))
        probe.sendall(b"GET /api/session HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        release.set()
        statuses = []
        for s in [*socks, probe]:
            s.settimeout(30)
            head = s.recv(65536).split(b"\r\n", 1)[0]
            statuses.append(head.split(b" ")[1].decode())
            s.close()
    finally:
        release.set()
        server.stop()
    busy = statuses.count("503")
    assert busy == 0, f"{busy} of {len(statuses)} polls refused: {json.dumps(sorted(set(statuses)))}"
    assert statuses == ["200"] * (DEVICES + 1)


def test_a_request_that_waited_past_the_queue_deadline_is_refused_unrun():
    """A request still waiting for a worker after `queue_wait` gets 503 server_busy and never
    reaches the application (a payment its payer stopped waiting for is not taken); the one
    that was running is answered."""
    release = threading.Event()
    ran: list[str] = []

    def app(environ, start_response):
        ran.append(environ["PATH_INFO"])
        release.wait(30)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    server = HttpServer(app, [("127.0.0.1", 0)], Limits(workers=1, queue_wait=0.5))
    server.start()
    try:
        running = socket.create_connection(("127.0.0.1", server.port))
        running.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        while not ran:
            time.sleep(0.01)
        waiting = socket.create_connection(("127.0.0.1", server.port))
        waiting.sendall(b"POST /api/channels/x/payments HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        time.sleep(1.0)  # past the deadline, in the queue behind the running one
        release.set()
        answers = []
        for s in (running, waiting):
            s.settimeout(30)
            answers.append(s.recv(65536))
            s.close()
    finally:
        release.set()
        server.stop()
    assert answers[0].startswith(b"HTTP/1.1 200")
    assert answers[1].startswith(b"HTTP/1.1 503") and b"server_busy" in answers[1]
    assert ran == ["/first"]
