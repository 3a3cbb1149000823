"""Retry with exponential back-off for chain backends.

Only transient failures are retried (the node is down, restarting, overloaded or slow); an
answer that says "no" (bad request, unknown method, bad credentials) is final at once. When the
attempts run out, `ChainUnavailable` is raised so the caller can keep its state and try later.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from bitmesh.errors import ChainUnavailable

log = logging.getLogger(__name__)

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")


class TransientError(Exception):
    """Raised by a backend for a failure that is worth another attempt (e.g. node warming up)."""


def is_transient(exc: BaseException) -> bool:
    """Connection refused/reset, timeouts, HTTP 5xx and 429: the kinds of failure that pass."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, urllib.error.HTTPError):  # before URLError: it is a subclass
        return exc.code >= 500 or exc.code == 429
    if isinstance(exc, urllib.error.URLError):
        # reason is an OSError for network failures, a str for e.g. an unknown URL scheme
        return isinstance(exc.reason, OSError)
    # RemoteDisconnected is a ConnectionResetError; IncompleteRead/BadStatusLine come from a
    # node dying mid-answer
    return isinstance(exc, ConnectionError | TimeoutError | http.client.IncompleteRead | http.client.BadStatusLine)


def describe(exc: BaseException) -> str:
    """A short description of a failure that never carries a URL (URLs may hold credentials)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return describe(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def redact_url(url: str) -> str:
    """scheme://host:port/path of `url` without user and password, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class Retry:
    """`attempts` tries in all; the wait before retry k (k = 1, 2, ...) is
    min(base_delay * factor**(k-1), max_delay). `sleep` is injectable so tests need not wait."""

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 8.0
    factor: float = 2.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0 or self.factor < 1:
            raise ValueError("attempts >= 1, delays >= 0 and factor >= 1 are required")

    def delays(self) -> list[float]:
        """The waits between attempts, in order (attempts - 1 of them)."""
        return [min(self.base_delay * self.factor**k, self.max_delay) for k in range(self.attempts - 1)]

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn`, retrying transient failures; `what` names the operation in logs (no secrets)."""
        delays = self.delays()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == self.attempts:
                    raise ChainUnavailable(f"{what}: {describe(exc)} (gave up after {self.attempts} attempts)") from exc
                delay = delays[attempt - 1]
                log.warning(
                    "%s failed (%s); retry %d/%d in %.2fs",
                    what,
                    describe(exc),
                    attempt,
                    self.attempts - 1,
                    delay,
                )
                self.sleep(delay)
        raise AssertionError("unreachable")  # the loop always returns or raises


NO_RETRY = Retry(attempts=1)
