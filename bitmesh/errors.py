"""Errors with stable codes.

Every refusal the service gives a client or an operator carries one of these codes; the
codes are part of the protocol (docs/protocol.md) and never change meaning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class BitMeshError(Exception):
    """Base error: `code` is stable and machine-readable, `message` is for people."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str = "", code: str | None = None, http_status: int | None = None):
        super().__init__(message or self.__class__.__doc__ or self.code)
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status

    @property
    def message(self) -> str:
        return str(self)

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def answer(what: str, call: Callable[[], dict]) -> tuple[int, dict]:
    """(status, body) for an operator or client request: `call`'s dict with 200, a
    BitMeshError as its status and {"error": {"code", "message"}}, anything else logged (with
    `what`, e.g. the path or ubus method) and answered as internal_error, revealing nothing."""
    try:
        return 200, call()
    except BitMeshError as e:
        return e.http_status, e.to_json()
    except Exception:
        log.exception("unhandled error in %s", what)
        return 500, {"error": {"code": "internal_error", "message": "internal error"}}


class RequestError(BitMeshError):
    """The request is malformed."""

    code = "bad_request"
    http_status = 400


class ChannelError(BitMeshError):
    """The channel refused the request; its state is unchanged."""

    code = "channel_error"
    http_status = 409


class ConfigError(BitMeshError):
    """A configuration option is invalid."""

    code = "config_invalid"
    http_status = 500


class ChainError(BitMeshError):
    """The chain backend failed."""

    code = "chain_error"
    http_status = 502


class ChainUnavailable(ChainError):
    """The chain backend did not answer, even after retries."""

    code = "chain_unavailable"
    http_status = 503


class BroadcastRejected(ChainError):
    """The node did not accept the transaction."""

    code = "broadcast_rejected"
    http_status = 502


class StorageError(BitMeshError):
    """The change could not be stored durably: it was refused, nothing was acknowledged."""

    code = "storage_failed"
    http_status = 507  # Insufficient Storage: a payer retries a 5xx later


class StorageFull(StorageError):
    """The router's flash is full: the change was refused, nothing was acknowledged."""

    code = "storage_full"


class KeyMismatch(BitMeshError):
    """The seed derives another key than the one a channel was opened with: never sign with it."""

    code = "seed_mismatch"
    http_status = 500
