"""Who gets fresh evidence, when, and what is answered from the cache.

The attestation endpoints are unauthenticated: anyone can ask, and every fresh answer costs a
hardware collection (a TDX quote, an SNP report, one SPDM exchange per GPU), one at a time. Three
parts keep a burst from starving real verifiers:

* :class:`RateLimiter` — a token bucket per client address: beyond its burst a client gets
  429 with ``Retry-After`` instead of a place in the queue.
* :class:`EvidenceScheduler` — one collection at a time, fed from a bounded queue (429 when
  full). Document requests waiting together share one collection: the evidence answers all their
  nonces (up to ``max_batch``), so a verifier waits for at most the collection in progress and
  its own, not for every earlier request. ACI requests bind exactly one nonce and are answered
  one per collection.
* :class:`DocumentCache` — the unchallenged document (and ACI report), refreshed in the
  background well before its stated maximum age; requests without a nonce are answered from
  memory and never wait for hardware. An expired entry is never served.

Expiry is judged by two clocks, and the earlier deadline wins: the monotonic clock (a deadline
taken before the collection started, so never later than ``issued_at + max_age`` in elapsed
time, whatever the wall clock says) and the wall clock against the document's own
``issued_at + max_age_s``. The host influences the guest's wall clock (a fast clock, a step
forward or back); neither moves the monotonic deadline, and a step forward ends the entry early
by the wall clock (the cache then refreshes at once). What a *verifier* accepts is its own
decision, against its own clock (:meth:`attest.document.AttestationDocument.check_binding`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attest.document import MAX_NONCES, AttestationDocument
from attest.errors import Error, EvidenceCollectionError
from server.attestation import AttestationService
from server.metrics import Metrics

__all__ = [
    "AttestationFrontend",
    "CachedEntry",
    "DocumentCache",
    "EvidenceScheduler",
    "QueueFull",
    "RateLimiter",
]

logger = logging.getLogger(__name__)

#: How long one evidence collection may take before its requests fail (503).
COLLECT_TIMEOUT_S = 30.0


class QueueFull(Exception):
    """The evidence queue is full; ``retry_after_s`` says when to come back."""

    def __init__(self, pending: int, retry_after_s: int) -> None:
        super().__init__(f"{pending} attestation requests are already waiting for evidence")
        self.retry_after_s = retry_after_s


class RateLimiter:
    """A token bucket per client key (``rate`` per second, ``burst`` at most), LRU-bounded."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._max = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, client: str) -> float:
        """Take one token for ``client``: 0.0 when granted, else the seconds until one is free."""
        now = self._clock()
        tokens, last = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait


@dataclass(slots=True)
class _Request:
    kind: str  # "document" | "aci" | "cached-document" | "cached-aci"
    nonce: bytes | None
    future: asyncio.Future[Any]


class EvidenceScheduler:
    """Run evidence collections one at a time from a bounded queue, batching document nonces."""

    def __init__(
        self,
        service: AttestationService,
        *,
        max_pending: int = 64,
        max_batch: int = 32,
        cached_max_age_s: int = 60,
        metrics: Metrics | None = None,
    ) -> None:
        if not 1 <= max_batch <= MAX_NONCES:
            raise ValueError(f"max_batch must be between 1 and {MAX_NONCES}")
        self.service = service
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.cached_max_age_s = cached_max_age_s
        self._metrics = metrics
        self._queue: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_collect_s = 0.05

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="evidence-scheduler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await _cancel(task)
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.cancel()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def document(self, nonce: bytes) -> AttestationDocument:
        """A document whose evidence answers ``nonce`` (maybe beside others). Raises QueueFull."""
        document, _ = await self._submit("document", nonce)
        return document  # type: ignore[no-any-return]

    async def document_bytes(self, nonce: bytes) -> bytes:
        """:meth:`document`, serialised (once per collection, shared by its batch)."""
        _, body = await self._submit("document", nonce)
        return body  # type: ignore[no-any-return]

    async def aci(self, nonce: bytes) -> dict[str, Any]:
        """An ACI report bound to ``nonce``. Raises QueueFull."""
        report, _ = await self._submit("aci", nonce)
        return report  # type: ignore[no-any-return]

    async def aci_bytes(self, nonce: bytes) -> bytes:
        """:meth:`aci`, serialised."""
        _, body = await self._submit("aci", nonce)
        return body  # type: ignore[no-any-return]

    async def cached_document(self) -> AttestationDocument:
        """A new unchallenged document (for the cache; jumps the queue)."""
        document, _ = await self._submit("cached-document", None, front=True)
        return document  # type: ignore[no-any-return]

    async def cached_aci(self) -> dict[str, Any]:
        """A new unchallenged ACI report (for the cache; jumps the queue)."""
        report, _ = await self._submit("cached-aci", None, front=True)
        return report  # type: ignore[no-any-return]

    async def _submit(self, kind: str, nonce: bytes | None, *, front: bool = False) -> Any:
        if not front and len(self._queue) >= self.max_pending:
            retry = max(1, math.ceil(self._last_collect_s * len(self._queue) / self.max_batch))
            raise QueueFull(len(self._queue), retry)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        request = _Request(kind=kind, nonce=nonce, future=future)
        if front:
            self._queue.appendleft(request)
        else:
            self._queue.append(request)
        self._wake.set()
        try:
            return await future
        finally:
            # Answered: already popped. The client went away (cancelled): drop its place.
            with contextlib.suppress(ValueError):
                self._queue.remove(request)

    def _next_batch(self) -> list[_Request]:
        first = self._queue.popleft()
        batch = [first]
        if first.kind == "document":
            rest: deque[_Request] = deque()
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if item.kind == "document" and item.nonce not in {b.nonce for b in batch}:
                    batch.append(item)
                else:
                    rest.append(item)
            self._queue.extendleft(reversed(rest))
        return batch

    def _collect(self, batch: list[_Request]) -> tuple[Any, bytes]:
        """Collect once for ``batch``; return the result and its JSON bytes (made once)."""
        kind = batch[0].kind
        if kind in ("document", "cached-document"):
            if kind == "document":
                document = self.service.document([r.nonce for r in batch if r.nonce is not None])
            else:
                document = self.service.document([], max_age_s=self.cached_max_age_s)
            return document, document.to_bytes()
        report = self.service.aci(batch[0].nonce)
        return report, _json_bytes(report)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [r for r in self._next_batch() if not r.future.done()]
            if not batch:
                continue
            started = time.monotonic()
            try:
                result = await asyncio.wait_for(asyncio.to_thread(self._collect, batch), COLLECT_TIMEOUT_S)
            except TimeoutError:
                # The hardware (or the host's quoting service) stalls: fail these requests; the
                # stuck thread still holds the service's lock, so later collections wait for it.
                stalled = EvidenceCollectionError(
                    f"evidence collection took longer than {COLLECT_TIMEOUT_S:.0f} s"
                )
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(stalled)
                continue
            except Exception as exc:  # delivered to every waiter (an Error: evidence collection failed)
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                if not isinstance(exc, Error):
                    logger.exception("evidence collection failed")
                continue
            finally:
                self._last_collect_s = time.monotonic() - started
                if self._metrics is not None:
                    self._metrics.attestation_collect_seconds.observe(self._last_collect_s)
            if self._metrics is not None and batch[0].kind == "document":
                self._metrics.attestation_batch.observe(len(batch))
            for request in batch:
                if not request.future.done():
                    request.future.set_result(result)


@dataclass(frozen=True, slots=True)
class CachedEntry:
    """Serialised bytes, when they were made and until when they may be served, by both clocks.

    ``made`` and ``expires`` are monotonic seconds (``made`` taken before the collection began);
    ``wall_expires`` is Unix time: the document's ``issued_at + max_age_s`` (for the ACI report,
    which states no time, the wall clock before its collection plus the maximum age).
    """

    body: bytes
    made: float
    expires: float
    wall_expires: float = math.inf

    def age(self, now: float) -> float:
        """Seconds since the entry was made, by the monotonic clock ``now``."""
        return now - self.made

    def alive(self, now: float, wall_now: float) -> bool:
        """Whether the entry may still be served: before both deadlines, each by its own clock."""
        return now < self.expires and wall_now < self.wall_expires

    def remaining(self, now: float, wall_now: float) -> float:
        """Seconds it may still be served (``Cache-Control: max-age``): the nearer deadline."""
        return max(0.0, min(self.expires - now, self.wall_expires - wall_now))


class DocumentCache:
    """The unchallenged document and ACI report, refreshed in the background.

    Refreshes every ``max_age_s / 3`` seconds, and at once when an entry was found dead before
    its monotonic deadline (the wall clock stepped forward); a failed refresh is logged and
    retried sooner, and the previous entry is served only until its own expiry.

    ``clock`` is the monotonic clock, ``wall_clock`` Unix time (both parameters for tests). An
    entry is served only while *both* say it is younger than ``max_age_s``
    (:meth:`CachedEntry.alive`): a document never outlives ``issued_at + max_age`` by the
    enclave's wall clock, nor ``max_age`` seconds of elapsed time from before its collection.
    """

    def __init__(
        self,
        scheduler: EvidenceScheduler,
        *,
        max_age_s: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._scheduler = scheduler
        self.max_age_s = max_age_s
        self._clock = clock
        self._wall_clock = wall_clock
        self.document: CachedEntry | None = None
        self.aci: CachedEntry | None = None
        self._task: asyncio.Task[None] | None = None
        self._stale = asyncio.Event()

    def current(self, which: str) -> CachedEntry | None:
        """The entry for ``"document"`` or ``"aci"`` if alive by both clocks, else None."""
        entry = self.document if which == "document" else self.aci
        if entry is None:
            return None
        now = self._clock()
        if not entry.alive(now, self._wall_clock()):
            if now < entry.expires:  # dead by the wall clock first: refresh now, not at the next tick
                self._stale.set()
            return None
        return entry

    async def refresh(self) -> None:
        """Collect both unchallenged forms now.

        Each entry's monotonic deadline is taken before its collection is queued (so it is never
        later than the evidence's own issue plus ``max_age_s``); the document's wall-clock
        deadline is the ``issued_at + max_age_s`` it states (the smaller of its and ours).
        """
        made = self._clock()
        document = await self._scheduler.cached_document()
        stated = document.claims.max_age_s or self.max_age_s
        self.document = CachedEntry(
            body=document.to_bytes(),
            made=made,
            expires=made + self.max_age_s,
            wall_expires=document.claims.issued_at + min(stated, self.max_age_s),
        )
        if not self.document.alive(self._clock(), self._wall_clock()):
            logger.warning(
                "attestation cache: the new unchallenged document is already past issued_at + %d s "
                "by the enclave's wall clock (issued_at %d, clock %.0f): not served",
                self.max_age_s,
                document.claims.issued_at,
                self._wall_clock(),
            )
        made, wall = self._clock(), self._wall_clock()
        aci = await self._scheduler.cached_aci()
        self.aci = CachedEntry(
            body=_json_bytes(aci),
            made=made,
            expires=made + self.max_age_s,
            wall_expires=wall + self.max_age_s,
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="attestation-cache")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await _cancel(task)

    async def _run(self) -> None:
        interval = max(1.0, self.max_age_s / 3)
        delay = interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stale.wait(), delay)
            if self._stale.is_set():
                self._stale.clear()
                await asyncio.sleep(1.0)  # at most one early refresh a second, whatever the clocks do
            try:
                await self.refresh()
                delay = interval
            except Exception as exc:
                reason = exc if isinstance(exc, Error) else type(exc).__name__
                logger.error(
                    "attestation cache: refresh failed (serving the previous one until it expires): %s",
                    reason,
                )
                delay = min(interval, 5.0)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _json_bytes(obj: Any) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(slots=True)
class AttestationFrontend:
    """What the attestation routes use: the service, its scheduler, cache and rate limiter."""

    service: AttestationService
    scheduler: EvidenceScheduler
    cache: DocumentCache
    limiter: RateLimiter

    @classmethod
    def create(
        cls,
        service: AttestationService,
        *,
        max_age_s: int = 60,
        rate: float = 8.0,
        burst: int = 32,
        max_pending: int = 64,
        max_batch: int = 32,
        metrics: Metrics | None = None,
    ) -> AttestationFrontend:
        scheduler = EvidenceScheduler(
            service, max_pending=max_pending, max_batch=max_batch, cached_max_age_s=max_age_s, metrics=metrics
        )
        return cls(
            service=service,
            scheduler=scheduler,
            cache=DocumentCache(scheduler, max_age_s=max_age_s),
            limiter=RateLimiter(rate=rate, burst=burst),
        )

    async def start(self) -> None:
        """Start the scheduler and fill the cache once (so ready implies a cached document)."""
        self.scheduler.start()
        await self.cache.refresh()
        self.cache.start()

    async def stop(self) -> None:
        await self.cache.stop()
        await self.scheduler.stop()
