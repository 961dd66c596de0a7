"""Who gets fresh evidence, when, and what is answered from the cache.

The attestation endpoints are unauthenticated: anyone can ask, and every fresh answer costs a
hardware collection (a TDX quote, an SNP report, one SPDM exchange per GPU), one at a time. Three
parts keep a burst from starving real verifiers:

* :class:`RateLimiter` — a token bucket per client group (:func:`client_group`: an IPv4
  address, an IPv6 /64): beyond its burst a client gets 429 with ``Retry-After`` instead of a
  place in the queue.
* :class:`EvidenceScheduler` — one collection at a time, fed from a bounded queue (429 when
  full, after the fair-share rule: a group with few requests waiting takes the place of the
  newest request of the group with the most). Document requests waiting together share one
  collection: the evidence answers all their nonces (up to ``max_batch``); a burst is gathered
  for a short window before its collection, and what a collection answers is chosen only when
  it holds the service's lock, so a verifier waits for at most the collection in progress and
  its own. A cache refresh of the document and a watchdog round are collections like any other:
  they answer the document nonces waiting beside them, so neither costs verifiers a quote of
  their own. ACI requests bind exactly one nonce and are answered one per collection.
* :class:`DocumentCache` — the unchallenged document (and ACI report), refreshed in the
  background well before its stated maximum age, in a lull of fresh requests when it can;
  requests without a nonce are answered from memory and never wait for hardware. An expired
  entry is never served.

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
import ipaddress
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from attest.document import MAX_NONCES, AttestationDocument
from foundation.errors import Error, EvidenceCollectionError
from server.attestation import AttestationService
from server.metrics import Metrics

__all__ = [
    "AttestationFrontend",
    "CachedEntry",
    "DocumentCache",
    "EvidenceScheduler",
    "QueueFull",
    "RateLimiter",
    "client_group",
]

logger = logging.getLogger(__name__)

#: How long one evidence collection may take before its requests fail (503).
COLLECT_TIMEOUT_S = 30.0
#: The burst window. A document request that finds nothing ahead of it waits this fraction of the
#: last collection's duration for others to join it: one quote answers the whole burst instead of
#: the first request alone and then the rest. Measured (uvicorn on loopback, 2 cores, 32 httpx
#: clients from distinct addresses, 10 bursts): a burst reaches the scheduler within 2.0 ms (p50)
#: and 4.3 ms (max) of its first request. With a 1 s quote the window is 50 ms, ten times that
#: spread (room for TLS and a loaded event loop), at most 5 % added to one collection, and it
#: saves a second one; with the sample TEE's ~1 ms collection it is ~0.05 ms: nothing to save.
BURST_WINDOW_FRACTION = 0.05
#: ... and never longer than this, whatever a collection costs.
BURST_WINDOW_MAX_S = 0.05
#: A cache refresh waits for a lull, this long since a fresh request last arrived or was answered
#: (or until its entry is within a third of its age: then it goes first), so that verifiers do not
#: wait behind it. Counted from the answer too: a verifier asking again as soon as it is answered
#: (every quote, ~1 s on TDX) leaves no lull, rather than one that opens just before it asks.
REFRESH_QUIET_S = 1.0

_FRESH_KINDS = ("document", "aci")
#: Collections whose evidence is a document: any of them also answers the waiting document nonces.
_DOCUMENT_KINDS = ("document", "cached-document", "watchdog")
#: A watchdog round's place in the order: before everything else (``_Request.due``).
_FIRST = -math.inf


class QueueFull(Exception):
    """The evidence queue is full; ``retry_after_s`` says when to come back."""

    def __init__(self, pending: int, retry_after_s: int) -> None:
        super().__init__(f"{pending} attestation requests are already waiting for evidence")
        self.retry_after_s = retry_after_s


def client_group(host: str) -> str:
    """The unit a client is limited and queued by: its IPv4 address, or its IPv6 /64.

    One IPv6 host is usually given a whole /64: counting its addresses one by one would give it
    2**64 shares of the queue. An IPv4-mapped IPv6 address is its IPv4 address; anything that is
    not an address (a test client's name) is itself.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


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


@dataclass(slots=True, eq=False)
class _Request:
    kind: str  # "document" | "aci" | "cached-document" | "cached-aci" | "watchdog"
    nonce: bytes | None
    future: asyncio.Future[Any]
    client: str = ""
    arrived: float = 0.0
    #: Cache refreshes and watchdog rounds: from then on it goes before verifiers (monotonic
    #: seconds; a watchdog round is due at once).
    due: float = math.inf


@dataclass(slots=True)
class _Attempt:
    """One turn of the collector: what it took (at the moment it held the lock) and how long."""

    batch: list[_Request] = field(default_factory=list)
    abandoned: bool = False
    collect_s: float = 0.0


class _Stalled(Exception):
    """The service's lock was not free within the collection timeout (a stuck collection)."""


class EvidenceScheduler:
    """Run evidence collections one at a time, each answering every document nonce waiting.

    When a collection starts is decided here; *what* it answers is decided only once the
    service's lock is held (:attr:`AttestationService.lock`, shared with the watchdog's device
    checks), so the requests that arrived while an earlier collection held it all go into the
    next collection, which starts as soon as the lock is free. Its head is:

    1. a watchdog round (:meth:`watchdog_document`), else a cache refresh past its due time (its
       entry is in its last third);
    2. else the oldest fresh request;
    3. else a cache refresh, once no fresh request came for ``quiet_s`` seconds.

    An ACI report (fresh or cached) is collected for its head alone: its report data binds one
    nonce, or none. Any other head makes a document collection, and it answers, beside its head,
    a waiting watchdog round, a waiting document refresh (whether due or not: the cache gets
    evidence it would have asked for soon) and up to ``max_batch`` nonces in all, the waiting
    document nonces taken round-robin across client groups. The document states ``max_age_s``
    when a refresh is among them (it serves the cache too). A document request that found the
    collector idle first waits the burst window (:attr:`window_s`) or until ``max_batch`` are
    waiting.

    The queue of fresh requests holds ``max_pending``. When it is full, a client group with fewer
    requests waiting than the group holding the most, less one, takes the newest place of that
    group (whose request gets :class:`QueueFull`); otherwise the newcomer gets QueueFull. So a
    verifier is refused only when every waiting request is from a different group than its own
    and no group holds two: to shut one out, a flood needs ``max_pending`` groups (addresses, or
    IPv6 /64s) each keeping one request waiting, not one address with a deep pipeline.
    """

    def __init__(
        self,
        service: AttestationService,
        *,
        max_pending: int = 64,
        max_batch: int = MAX_NONCES,
        cached_max_age_s: int = 60,
        metrics: Metrics | None = None,
        window_max_s: float = BURST_WINDOW_MAX_S,
        quiet_s: float = REFRESH_QUIET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= max_batch <= MAX_NONCES:
            raise ValueError(f"max_batch must be between 1 and {MAX_NONCES}")
        self.service = service
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.cached_max_age_s = cached_max_age_s
        self.window_max_s = window_max_s
        self.quiet_s = quiet_s
        self._clock = clock
        self._metrics = metrics
        self._queue: deque[_Request] = deque()  # fresh requests, in arrival order
        self._refreshes: list[_Request] = []  # cache refreshes waiting for a lull or their due time
        self._last_fresh = -math.inf
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_collect_s = 0.05
        #: Collections run, by kind (for tests and the bench).
        self.collections: dict[str, int] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="evidence-scheduler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await _cancel(task)
        for request in (*self._queue, *self._refreshes):
            if not request.future.done():
                request.future.cancel()
        self._queue.clear()
        self._refreshes.clear()

    @property
    def pending(self) -> int:
        """Fresh requests waiting (cache refreshes not counted)."""
        return len(self._queue)

    @property
    def window_s(self) -> float:
        """The burst window now: a fraction of the last collection's duration, bounded."""
        return min(self.window_max_s, BURST_WINDOW_FRACTION * self._last_collect_s)

    async def document(self, nonce: bytes, *, client: str = "") -> AttestationDocument:
        """A document whose evidence answers ``nonce`` (maybe beside others). Raises QueueFull."""
        document, _ = await self._submit("document", nonce, client=client)
        return document  # type: ignore[no-any-return]

    async def document_bytes(self, nonce: bytes, *, client: str = "") -> bytes:
        """:meth:`document`, serialised (once per collection, shared by its batch)."""
        _, body = await self._submit("document", nonce, client=client)
        return body  # type: ignore[no-any-return]

    async def aci(self, nonce: bytes, *, client: str = "") -> dict[str, Any]:
        """An ACI report bound to ``nonce``. Raises QueueFull."""
        report, _ = await self._submit("aci", nonce, client=client)
        return report  # type: ignore[no-any-return]

    async def aci_bytes(self, nonce: bytes, *, client: str = "") -> bytes:
        """:meth:`aci`, serialised."""
        _, body = await self._submit("aci", nonce, client=client)
        return body  # type: ignore[no-any-return]

    async def cached_document(self, *, wait_s: float = 0.0) -> AttestationDocument:
        """A new unchallenged document (for the cache), within ``wait_s`` seconds of a lull."""
        document, _ = await self._submit("cached-document", None, wait_s=wait_s)
        return document  # type: ignore[no-any-return]

    async def watchdog_document(self, nonce: bytes) -> AttestationDocument:
        """A document answering the watchdog's ``nonce``, collected next (before any verifier).

        It answers the verifiers' nonces waiting at that moment too: a watchdog round costs them
        no quote of their own. Never refused (it is not a client's request).
        """
        document, _ = await self._submit("watchdog", nonce, wait_s=_FIRST)
        return document  # type: ignore[no-any-return]

    async def cached_aci(self, *, wait_s: float = 0.0) -> dict[str, Any]:
        """A new unchallenged ACI report (for the cache), within ``wait_s`` seconds of a lull."""
        report, _ = await self._submit("cached-aci", None, wait_s=wait_s)
        return report  # type: ignore[no-any-return]

    async def _submit(self, kind: str, nonce: bytes | None, *, client: str = "", wait_s: float = 0.0) -> Any:
        now = self._clock()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        request = _Request(kind=kind, nonce=nonce, future=future, client=client, arrived=now)
        if kind in _FRESH_KINDS:
            self._admit(request)
            self._last_fresh = now
            queue: deque[_Request] | list[_Request] = self._queue
        else:
            request.due = _FIRST if kind == "watchdog" else now + max(0.0, wait_s)
            self._refreshes.append(request)
            queue = self._refreshes
        self._wake.set()
        try:
            return await future
        finally:
            # Answered: already taken. The client went away (cancelled) or lost its place: drop it.
            with contextlib.suppress(ValueError):
                queue.remove(request)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._last_collect_s * (1 + len(self._queue) / self.max_batch)))

    def _admit(self, request: _Request) -> None:
        """Queue a fresh request, or make room by the fair-share rule, or raise QueueFull."""
        if len(self._queue) < self.max_pending:
            self._queue.append(request)
            return
        counts = Counter(r.client for r in self._queue)
        most = max(counts.values())
        if counts[request.client] + 1 < most:
            victim = next(r for r in reversed(self._queue) if counts[r.client] == most)
            self._queue.remove(victim)
            if not victim.future.done():
                victim.future.set_exception(QueueFull(len(self._queue), self._retry_after()))
            self._queue.append(request)
            return
        raise QueueFull(len(self._queue), self._retry_after())

    def _refresh_ready(self, now: float) -> tuple[bool, float]:
        """Whether a waiting refresh or round may run now (due, or a lull), else in how many seconds."""
        if not self._refreshes:
            return False, math.inf
        due = min(r.due for r in self._refreshes)
        if due <= now:
            return True, 0.0
        if self._queue:
            return False, due - now
        lull = self._last_fresh + self.quiet_s
        return lull <= now, min(due, lull) - now

    def _ready_in(self, now: float) -> float:
        """Seconds until the collector should take its next turn (0: now; inf: nothing to do)."""
        ready, wait = self._refresh_ready(now)
        if ready:
            return 0.0
        if self._queue:
            head = self._queue[0]
            if head.kind != "document" or sum(r.kind == "document" for r in self._queue) >= self.max_batch:
                return 0.0
            wait = min(wait, head.arrived + self.window_s - now)
        return max(0.0, wait)

    def _take(self, attempt: _Attempt) -> list[_Request]:
        """Choose what the collection that now holds the lock answers (in the event loop)."""
        if attempt.abandoned:
            return []
        now = self._clock()
        due = sorted(
            (r for r in self._refreshes if r.due <= now and not r.future.done()), key=lambda r: r.due
        )
        head: _Request | None = None
        if due:
            head = due[0]
        elif any(not r.future.done() for r in self._queue):
            head = next(r for r in self._queue if not r.future.done())
        elif self._refresh_ready(now)[0]:
            head = next(r for r in self._refreshes if not r.future.done())
        batch: list[_Request] = []
        if head is not None:
            batch = self._document_batch(head) if head.kind in _DOCUMENT_KINDS else [head]
        for request in batch:
            (self._queue if request.kind in _FRESH_KINDS else self._refreshes).remove(request)
        attempt.batch = batch
        return batch

    def _document_batch(self, head: _Request) -> list[_Request]:
        """What one document collection headed by ``head`` answers.

        The waiting watchdog round and document refresh (at most one each), then waiting
        document requests, one per client group in turn, up to ``max_batch`` nonces in all.
        """
        batch: list[_Request] = []
        nonces: set[bytes | None] = set()
        for kind in ("watchdog", "cached-document"):
            internal = head if head.kind == kind else None
            internal = internal or next(
                (r for r in self._refreshes if r.kind == kind and not r.future.done()), None
            )
            if internal is not None:
                batch.append(internal)
                nonces.add(internal.nonce)
        groups: dict[str, deque[_Request]] = {}
        for r in self._queue:
            if r.kind == "document" and not r.future.done():
                groups.setdefault(r.client, deque()).append(r)
        answered = sum(r.nonce is not None for r in batch)
        while groups and answered < self.max_batch:
            for client in list(groups):
                waiting = groups[client]
                request = waiting.popleft()
                if not waiting:
                    del groups[client]
                if request.nonce in nonces:  # the same nonce twice: answered by the next collection
                    continue
                nonces.add(request.nonce)
                batch.append(request)
                answered += 1
                if answered == self.max_batch:
                    break
        batch.sort(key=lambda r: r is not head)  # the head first: the collection is counted by it
        return batch

    def _collect(self, batch: list[_Request]) -> tuple[Any, bytes]:
        """Collect once for ``batch``; return the result and its JSON bytes (made once)."""
        kind = batch[0].kind
        if kind in _DOCUMENT_KINDS:
            cached = any(r.kind == "cached-document" for r in batch)
            document = self.service.document(
                [r.nonce for r in batch if r.nonce is not None],
                max_age_s=self.cached_max_age_s if cached else None,
            )
            return document, document.to_bytes()
        report = self.service.aci(batch[0].nonce)
        return report, _json_bytes(report)

    def _turn(self, loop: asyncio.AbstractEventLoop, attempt: _Attempt) -> Any:
        """In a worker thread: take the service's lock, then the batch, then collect for it."""
        lock = self.service.lock
        if not lock.acquire(timeout=COLLECT_TIMEOUT_S):
            raise _Stalled
        try:
            taking = asyncio.run_coroutine_threadsafe(_call(self._take, attempt), loop)
            batch = taking.result(COLLECT_TIMEOUT_S)
            if not batch:
                return None
            started = time.monotonic()
            try:
                return self._collect(batch)
            finally:
                attempt.collect_s = time.monotonic() - started
        finally:
            lock.release()

    async def _until_ready(self) -> None:
        while True:
            delay = self._ready_in(self._clock())
            if delay <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), None if math.isinf(delay) else delay)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._until_ready()
            attempt = _Attempt()
            failure: BaseException | None = None
            try:
                turn = asyncio.to_thread(self._turn, loop, attempt)
                result = await asyncio.wait_for(turn, COLLECT_TIMEOUT_S)
            except (TimeoutError, _Stalled):
                # The hardware (or the host's quoting service) stalls, or a watchdog round holding
                # the lock does: fail the requests this turn was for; a stuck thread still holds
                # the lock, so later turns wait for it (and fail the same way).
                attempt.abandoned = True
                if not attempt.batch:  # still waiting for the lock: fail those it would have taken
                    attempt.batch = self._take(_Attempt())
                failure = EvidenceCollectionError(
                    f"evidence collection took longer than {COLLECT_TIMEOUT_S:.0f} s"
                )
            except Exception as exc:  # delivered to every waiter (an Error: evidence collection failed)
                failure = exc
                if not isinstance(exc, Error):
                    logger.exception("evidence collection failed")
            batch = attempt.batch
            if not batch:
                continue
            self._last_collect_s = attempt.collect_s or self._last_collect_s
            kind = batch[0].kind
            self.collections[kind] = self.collections.get(kind, 0) + 1
            if self._metrics is not None:
                self._metrics.attestation_collect_seconds.observe(attempt.collect_s)
                verifiers = sum(r.kind == "document" for r in batch)
                if verifiers and failure is None:
                    self._metrics.attestation_batch.observe(verifiers)
            if any(r.kind in _FRESH_KINDS for r in batch):
                self._last_fresh = self._clock()  # a lull counts from the last answer, not arrival
            for request in batch:
                if request.future.done():
                    continue
                if failure is not None:
                    request.future.set_exception(failure)
                else:
                    request.future.set_result(result)


async def _call(function: Callable[[_Attempt], list[_Request]], attempt: _Attempt) -> list[_Request]:
    return function(attempt)


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

    Refreshes every ``max_age_s / 3`` seconds (in a lull of verifiers, or at the latest when an
    entry has a third of its age left), and at once when an entry was found dead before
    its monotonic deadline (the wall clock stepped forward); a failed refresh is logged and
    retried sooner, and the previous entry is served only until its own expiry.

    The document's refresh costs verifiers nothing (it rides along with their collection:
    :class:`EvidenceScheduler`); the ACI report's is a collection of its own. So an ACI report
    that nobody read since it was made is refreshed only in a lull, in the background: under
    steady fresh traffic it may lapse, and the first request that finds none (503 with
    ``Retry-After: 1``) asks for one at once.

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
        #: Whether the ACI entry was served since it was made (else its refresh waits for a lull).
        self.aci_read = False
        self._aci_task: asyncio.Task[None] | None = None
        self._aci_urgent = False

    def current(self, which: str) -> CachedEntry | None:
        """The entry for ``"document"`` or ``"aci"`` if alive by both clocks, else None."""
        entry = self.document if which == "document" else self.aci
        if entry is None:
            if which == "aci" and self._task is not None:
                self._want_aci()
            return None
        now = self._clock()
        if not entry.alive(now, self._wall_clock()):
            if now < entry.expires:  # dead by the wall clock first: refresh now, not at the next tick
                self._stale.set()
            if which == "aci" and self._task is not None:
                self._want_aci()
            return None
        if which == "aci":
            self.aci_read = True
        return entry

    def _slack(self, entry: CachedEntry | None) -> float:
        """How long a refresh of ``entry`` may wait for a lull: until its last third of age."""
        if entry is None:
            return 0.0
        return max(0.0, entry.remaining(self._clock(), self._wall_clock()) - self.max_age_s / 3)

    async def refresh(self, *, in_lull: bool = False) -> None:
        """Collect both unchallenged forms: now, or (``in_lull``) when no verifier is waiting.

        With ``in_lull`` each collection waits for a moment without fresh requests
        (:class:`EvidenceScheduler`), but only while its current entry has more than a third of
        its age left; then it goes before the verifiers waiting.

        Each entry's monotonic deadline is taken before its collection is queued (so it is never
        later than the evidence's own issue plus ``max_age_s``, however long it waited); the
        document's wall-clock deadline is the ``issued_at + max_age_s`` it states (the smaller of
        its and ours).
        """
        made = self._clock()
        wait_s = self._slack(self.document) if in_lull else 0.0
        document = await self._scheduler.cached_document(wait_s=wait_s)
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
        if in_lull and self.aci is not None and not self.aci_read:
            self._refresh_aci_later(urgent=False)  # nobody read it: not worth a verifier's wait
            return
        await self._refresh_aci(wait_s=self._slack(self.aci) if in_lull else 0.0)

    async def _refresh_aci(self, *, wait_s: float) -> None:
        made, wall = self._clock(), self._wall_clock()
        aci = await self._scheduler.cached_aci(wait_s=wait_s)
        self.aci = CachedEntry(
            body=_json_bytes(aci),
            made=made,
            expires=made + self.max_age_s,
            wall_expires=wall + self.max_age_s,
        )
        self.aci_read = False

    def _want_aci(self) -> None:
        """A request found no live ACI report: collect one now (once), ahead of a lull."""
        if not self._aci_urgent:
            self._refresh_aci_later(urgent=True)

    def _refresh_aci_later(self, *, urgent: bool) -> None:
        """Refresh the ACI report in the background: in a lull, or (``urgent``) next."""
        task = self._aci_task
        if task is not None and not task.done():
            if not urgent or self._aci_urgent:
                return
            task.cancel()  # a lull-only refresh still waiting: replaced by an urgent one
        self._aci_urgent = urgent
        self._aci_task = asyncio.create_task(self._aci_in_background(urgent), name="attestation-cache-aci")

    async def _aci_in_background(self, urgent: bool) -> None:
        try:
            await self._refresh_aci(wait_s=0.0 if urgent else math.inf)
        except Exception as exc:
            reason = exc if isinstance(exc, Error) else type(exc).__name__
            logger.error("attestation cache: ACI report refresh failed: %s", reason)
        finally:
            if self._aci_urgent == urgent:
                self._aci_urgent = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="attestation-cache")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await _cancel(task)
        aci, self._aci_task = self._aci_task, None
        await _cancel(aci)

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
                await self.refresh(in_lull=True)
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
        max_batch: int = MAX_NONCES,
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
