"""Bounded retries with exponential backoff under one overall deadline.

Used by every key source that talks HTTP (KBS, CDH). Only *transient* faults are retried:
connection failures, timeouts and 5xx/429 answers. Anything the broker said on purpose (4xx)
is final. Time is injected (``clock``, ``sleep``) so tests never wait for real.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx

from attest.errors import KeyBrokerUnreachable

__all__ = ["Deadline", "RetryPolicy", "TransientFault", "call_with_retries", "is_tls_verification_failure"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How hard to try: attempts, backoff and the per-request timeout (the deadline caps all)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    request_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.request_timeout_s <= 0:
            raise ValueError("retry policy needs max_attempts >= 1, backoff >= 0, timeout > 0")

    def backoff(self, attempt: int) -> float:
        """Return the pause after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * float(2 ** (attempt - 1)))


class Deadline:
    """An absolute point in time (on ``clock``) by which an operation must finish."""

    __slots__ = ("_clock", "_end", "seconds")

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds <= 0:
            raise ValueError("a deadline must be positive")
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds

    def remaining(self) -> float:
        """Return the seconds left (never negative)."""
        return max(0.0, self._end - self._clock())

    @property
    def expired(self) -> bool:
        """Whether no time is left."""
        return self.remaining() <= 0.0


class TransientFault(Exception):
    """Raised by an attempt to ask for a retry; ``str()`` is safe to log (no secrets)."""


def is_tls_verification_failure(exc: BaseException) -> bool:
    """Return whether ``exc`` (or what caused it) is a TLS certificate verification failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def call_with_retries(
    attempt: Callable[[float], T],
    *,
    what: str,
    deadline: Deadline,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``attempt(timeout_s)`` until it succeeds, retrying :class:`TransientFault` and
    :class:`httpx.TransportError` with backoff, within ``deadline``.

    Each attempt gets ``min(policy.request_timeout_s, deadline.remaining())`` as its timeout.
    Any other exception propagates at once. A TLS verification failure is not retried.

    Raises:
        KeyBrokerUnreachable: attempts or time ran out; the message names ``what``, the number of
            attempts, the elapsed time and the last fault.
    """
    last = "no attempt was made"
    attempts = 0
    while attempts < policy.max_attempts and not deadline.expired:
        attempts += 1
        timeout = min(policy.request_timeout_s, deadline.remaining())
        try:
            return attempt(timeout)
        except httpx.TransportError as exc:
            if is_tls_verification_failure(exc):
                raise KeyBrokerUnreachable(
                    f"{what}: TLS certificate verification failed; the server's certificate does not "
                    "chain to the pinned CA (check --cacert and the server name in the URL)"
                ) from exc
            last = _describe_transport_error(exc)
        except TransientFault as exc:
            last = str(exc)
        pause = min(policy.backoff(attempts), deadline.remaining())
        if attempts < policy.max_attempts and pause > 0:
            logger.warning("%s: attempt %d failed (%s); retrying in %.2fs", what, attempts, last, pause)
            sleep(pause)
    raise KeyBrokerUnreachable(
        f"{what}: gave up after {attempts} attempt(s) within the {deadline.seconds:g}s deadline; "
        f"last error: {last}. Check that the service is running and reachable from the enclave."
    )


def _describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    return type(exc).__name__
