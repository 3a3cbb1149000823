"""Shared fixtures. Real components only: the bcoin node is a real regtest node."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.bcoin import BcoinNode
from tests.support.coins import Faucet, key_address, new_key
from tests.support.owrt import userland, why_no_userland
from tests.support.router import regtest

# CI sets this: there, an `owrt` test that skips (userland not built) is a failure, not a pass.
REQUIRE_OWRT = os.environ.get("BITMESH_REQUIRE_OWRT") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if userland() is not None:
        return
    skip = pytest.mark.skip(reason=why_no_userland())
    for item in items:
        if "owrt" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if REQUIRE_OWRT and report.skipped and "owrt" in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"owrt test skipped where BITMESH_REQUIRE_OWRT=1: {report.longrepr}"
    return report


@pytest.fixture(scope="session")
def _regtest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BcoinNode, Faucet]]:
    with regtest(tmp_path_factory.mktemp("bcoin")) as node_and_faucet:
        yield node_and_faucet


@pytest.fixture(scope="session")
def bcoin(_regtest: tuple[BcoinNode, Faucet]) -> BcoinNode:
    """One bcoin regtest node for the whole session, at height >= 1400 (segwit and CLTV active)."""
    return _regtest[0]


@pytest.fixture(scope="session")
def faucet(_regtest: tuple[BcoinNode, Faucet]) -> Faucet:
    """Pays any script from early 50 BTC coinbases of the session node: `faucet.pay(script, sats)`."""
    return _regtest[1]


@pytest.fixture
def bcoin_factory(tmp_path: Path) -> Iterator[Callable[..., BcoinNode]]:
    """`bcoin_factory(height=0)` starts an extra node (own datadir and ports), mined to `height`
    with throwaway coinbases; all are stopped at teardown."""
    nodes: list[BcoinNode] = []

    def make(height: int = 0) -> BcoinNode:
        node = BcoinNode(tmp_path / f"bcoin{len(nodes)}")
        nodes.append(node)
        node.start()
        if height:
            node.mine(height, key_address(new_key()))
        return node

    yield make
    for node in nodes:
        node.stop()


@pytest.fixture
def hotspot(bcoin: BcoinNode, faucet: Faucet, tmp_path: Path):
    """A router's channel side (manager, journal, HTTP portal) on the session node."""
    from tests.support.hotspot import Hotspot

    rig = Hotspot.start(bcoin, faucet, tmp_path / "state")
    yield rig
    rig.stop()


@pytest.fixture
def free_port() -> int:
    """A TCP port free on this machine right now."""
    from tests.support.bcoin import free_port as pick

    return pick()
