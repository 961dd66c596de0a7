"""Retries with exponential backoff and jitter that last the deadline they state.

Used by every key source that talks HTTP (KBS, CDH). Only *transient* faults are retried:
connection failures, timeouts and 5xx/429 answers. Anything the broker said on purpose (4xx)
is final, and so is a misconfiguration no retry can fix (a TLS certificate that does not verify,
plain HTTP answering a TLS handshake). By default attempts go on until the deadline (a KBS that
is restarting is reached when it comes back); the message when it gives up says how long it
tried and how many times. Time and randomness are injected (``clock``, ``sleep``,
``RetryPolicy.random``) so tests never wait for real.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from attest.kbs.http import PlainHttpAnswer, describe_transport_error
from foundation.errors import KeyBrokerUnreachable

__all__ = ["Deadline", "RetryPolicy", "TransientFault", "call_with_retries", "is_tls_verification_failure"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How to retry: backoff, jitter and the per-request timeout; the deadline caps everything.

    ``max_attempts`` None (the default) retries until the deadline. The pause after failed attempt
    ``n`` is ``initial_backoff_s * 2**(n-1)``, capped at ``max_backoff_s``, then spread by
    ``± jitter`` (a fraction) with ``random()`` (uniform in [0, 1)) so that enclaves restarted
    together do not retry in step.
    """

    max_attempts: int | None = None
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    jitter: float = 0.2
    request_timeout_s: float = 15.0
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (
            (self.max_attempts is not None and self.max_attempts < 1)
            or self.initial_backoff_s < 0
            or self.max_backoff_s < 0
            or not 0 <= self.jitter < 1
            or self.request_timeout_s <= 0
        ):
            raise ValueError(
                "retry policy needs max_attempts None or >= 1, backoffs >= 0, 0 <= jitter < 1, timeout > 0"
            )

    def backoff(self, attempt: int) -> float:
        """Return the pause after failed attempt number ``attempt`` (1-based), jitter included."""
        base = min(self.max_backoff_s, self.initial_backoff_s * float(2 ** min(attempt - 1, 62)))
        if self.jitter == 0:
            return base
        return base * (1.0 + self.jitter * (2.0 * self.random() - 1.0))


class Deadline:
    """An absolute point in time (on ``clock``) by which an operation must finish."""

    __slots__ = ("_clock", "_end", "_start", "seconds")

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds <= 0:
            raise ValueError("a deadline must be positive")
        self.seconds = seconds
        self._clock = clock
        self._start = clock()
        self._end = self._start + seconds

    def remaining(self) -> float:
        """Return the seconds left (never negative)."""
        return max(0.0, self._end - self._clock())

    def elapsed(self) -> float:
        """Return the seconds since the deadline was set."""
        return max(0.0, self._clock() - self._start)

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
    :class:`httpx.TransportError` with backoff, until ``deadline`` (or ``policy.max_attempts``).

    Each attempt gets ``min(policy.request_timeout_s, deadline.remaining())`` as its timeout.
    Any other exception propagates at once. Not retried: a TLS verification failure, and a TLS
    handshake answered in plain HTTP.

    Raises:
        KeyBrokerUnreachable: time (or attempts) ran out; the message names ``what``, the number
            of attempts, how long they took, the deadline and the last fault (with its address);
            or a TLS misconfiguration, named.
    """
    last = "no attempt was made"
    attempts = 0
    while not deadline.expired and (policy.max_attempts is None or attempts < policy.max_attempts):
        attempts += 1
        timeout = min(policy.request_timeout_s, deadline.remaining())
        try:
            return attempt(timeout)
        except httpx.TransportError as exc:
            if is_tls_verification_failure(exc):
                raise KeyBrokerUnreachable(
                    f"{what}: TLS certificate verification failed; the server's certificate does not "
                    "chain to the pinned CA (check the pinned CA certificate and the host name in the URL)"
                ) from exc
            try:
                last = describe_transport_error(exc)
            except PlainHttpAnswer as answer:
                raise KeyBrokerUnreachable(f"{what}: {answer}") from exc
        except TransientFault as exc:
            last = str(exc)
        if policy.max_attempts is not None and attempts >= policy.max_attempts:
            break
        pause = min(max(0.0, policy.backoff(attempts)), deadline.remaining())
        if pause > 0:
            logger.warning("%s: attempt %d failed (%s); retrying in %.2fs", what, attempts, last, pause)
            sleep(pause)
    elapsed = deadline.elapsed()
    if policy.max_attempts is not None and attempts >= policy.max_attempts and not deadline.expired:
        limit = (
            f"the retry policy's limit of {policy.max_attempts} attempt(s), before the "
            f"{deadline.seconds:g}s deadline"
        )
    else:
        limit = f"the {deadline.seconds:g}s deadline"
    raise KeyBrokerUnreachable(
        f"{what}: gave up after {attempts} attempt(s) over {elapsed:.1f}s ({limit}); last error: "
        f"{last}. Check that the service is running and reachable from the enclave."
    )
