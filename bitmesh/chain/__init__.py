"""Chain backends: the service's only view of the blockchain."""

from __future__ import annotations

from bitmesh.chain.base import ChainBackend
from bitmesh.errors import ConfigError

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from typing import Any

BACKEND_KINDS = ("core", "esplora")


def make_backend(kind: str, url: str, **opts: Any) -> ChainBackend:
    """The backend for config option `kind`: "core" (Bitcoin Core JSON-RPC; opts user,
    password, timeout, retry) or "esplora" (Esplora REST; opts timeout, retry)."""
    # imported here so that importing bitmesh.chain stays cheap on the router
    if kind == "core":
        from bitmesh.chain.core_rpc import CoreRpcBackend as cls
    elif kind == "esplora":
        from bitmesh.chain.esplora import EsploraBackend as cls
    else:
        raise ConfigError(f"unknown chain backend {kind!r}; use one of {', '.join(BACKEND_KINDS)}")
    try:
        return cls(url, **opts)
    except TypeError as exc:  # an option the backend does not take
        raise ConfigError(f"chain backend {kind!r}: {exc}") from None
