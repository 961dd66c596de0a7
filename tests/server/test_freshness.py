"""Who gets fresh evidence: per-client rate limits, a bounded queue, batched nonces, the cache."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from attest.document import AttestationDocument
from server.freshness import AttestationFrontend, DocumentCache, EvidenceScheduler, QueueFull, RateLimiter
from server.metrics import Metrics
from tests.server.test_attestation_document import NONCE, SPKI, service

#: check_binding's arguments for the cached (unchallenged) document.
CACHED_CHECK: dict[str, object] = {
    "nonce": None,
    "observed_tls_spki_sha256": SPKI,
    "expected_model_digest": None,
    "allow_insecure": True,
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_grants_the_burst_then_says_when_to_return() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # another client is not affected
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0


def test_rate_limiter_forgets_the_oldest_clients_beyond_its_bound() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=2, clock=Clock())
    limiter.acquire("a")
    limiter.acquire("b")
    limiter.acquire("c")  # evicts "a": it starts again with a full bucket
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("c") > 0


class SlowService:
    """Wraps the real service (sample TEE) and counts collections; each takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.05) -> None:
        self.inner = service()
        self.delay = delay
        self.collections: list[int] = []
        self.lock = threading.Lock()

    def document(self, nonces: Any, *, max_age_s: int | None = None) -> AttestationDocument:
        time.sleep(self.delay)
        with self.lock:
            self.collections.append(len(nonces))
        return self.inner.document(nonces, max_age_s=max_age_s)

    def aci(self, nonce: bytes | None) -> dict[str, Any]:
        time.sleep(self.delay)
        with self.lock:
            self.collections.append(-1)
        return self.inner.aci(nonce)


def test_concurrent_requests_share_collections_and_each_gets_its_nonce_answered() -> None:
    slow = SlowService()
    registry = CollectorRegistry()

    async def go() -> list[AttestationDocument]:
        scheduler = EvidenceScheduler(slow, max_batch=8, metrics=Metrics(registry))  # type: ignore[arg-type]
        scheduler.start()
        try:
            nonces = [bytes([i]) * 32 for i in range(20)]
            return await asyncio.gather(*(scheduler.document(n) for n in nonces))
        finally:
            await scheduler.stop()

    documents = asyncio.run(go())
    for i, doc in enumerate(documents):
        assert bytes([i]) * 32 in doc.claims.nonces
        doc.check_binding(
            nonce=bytes([i]) * 32,
            observed_tls_spki_sha256=SPKI,
            expected_model_digest=None,
            allow_insecure=True,
        )
    # 20 requests at once: the first alone, then batches of at most 8 -> 4 collections, not 20.
    assert sum(slow.collections) == 20 and len(slow.collections) <= 4 and max(slow.collections) <= 8
    assert registry.get_sample_value("enclave_serve_attestation_batch_nonces_count") == len(slow.collections)


def test_a_full_queue_refuses_with_a_retry_time_and_aci_requests_are_never_batched() -> None:
    slow = SlowService(delay=0.2)

    async def go() -> tuple[list[Any], int]:
        scheduler = EvidenceScheduler(slow, max_pending=3)  # type: ignore[arg-type]
        scheduler.start()
        try:
            tasks = [asyncio.create_task(scheduler.aci(bytes([i]) * 32)) for i in range(6)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return results, scheduler.pending
        finally:
            await scheduler.stop()

    results, pending = asyncio.run(go())
    refused = [r for r in results if isinstance(r, QueueFull)]
    answered = [r for r in results if isinstance(r, dict)]
    assert refused and all(r.retry_after_s >= 1 for r in refused)
    assert len(answered) == 6 - len(refused) and pending == 0
    assert slow.collections.count(-1) == len(answered)  # one collection per ACI nonce
    assert len({a["attestation"]["report_data"] for a in answered}) == len(answered)


def test_the_cache_serves_the_unchallenged_document_only_within_its_age() -> None:
    clock = Clock()

    async def go() -> tuple[Any, Any, Any]:
        scheduler = EvidenceScheduler(service(), cached_max_age_s=30)
        scheduler.start()
        cache = DocumentCache(scheduler, max_age_s=30, clock=clock)
        try:
            await cache.refresh()
            fresh = cache.current("document"), cache.current("aci")
            clock.now += 31
            return fresh[0], fresh[1], cache.current("document")
        finally:
            await scheduler.stop()

    document, aci, expired = asyncio.run(go())
    assert document is not None and aci is not None and expired is None
    body = json.loads(document.body)
    assert body["claims"]["nonces"] == [] and body["claims"]["max_age_s"] == 30
    claims = AttestationDocument.from_json(body)
    claims.check_binding(
        nonce=None, observed_tls_spki_sha256=SPKI, expected_model_digest=None, allow_insecure=True
    )
    assert json.loads(aci.body)["attestation"]["workload_keyset"]["tls_public_keys"] == [
        {"spki_sha256": SPKI}
    ]


def test_a_cached_document_past_its_age_does_not_verify() -> None:
    doc = service().document([], max_age_s=60)
    at = doc.claims.issued_at
    args = CACHED_CHECK
    doc.check_binding(**args, now=at + 59)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="60 s"):
        doc.check_binding(**args, now=at + 61)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="other nonces"):
        doc.check_binding(**{**args, "nonce": NONCE})  # type: ignore[arg-type]


def test_the_frontend_has_a_cached_document_before_it_returns() -> None:
    async def go() -> bool:
        frontend = AttestationFrontend.create(service(), max_age_s=10)
        await frontend.start()
        try:
            return (
                frontend.cache.current("document") is not None and frontend.cache.current("aci") is not None
            )
        finally:
            await frontend.stop()

    assert asyncio.run(go())


def test_a_client_that_goes_away_frees_its_place_in_the_queue() -> None:
    slow = SlowService(delay=0.2)

    async def go() -> int:
        scheduler = EvidenceScheduler(slow, max_pending=2)  # type: ignore[arg-type]
        scheduler.start()
        try:
            first = asyncio.create_task(scheduler.aci(bytes([1]) * 32))  # being collected
            await asyncio.sleep(0.05)
            waiting = [asyncio.create_task(scheduler.aci(bytes([i]) * 32)) for i in (2, 3)]
            await asyncio.sleep(0.01)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            pending = scheduler.pending
            await first
            return pending
        finally:
            await scheduler.stop()

    assert asyncio.run(go()) == 0


def test_the_verifier_bounds_a_cached_documents_age_whatever_it_states() -> None:
    doc = service().document([], max_age_s=3600)
    at = doc.claims.issued_at
    args = CACHED_CHECK
    doc.check_binding(**args, now=at + 299)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="the verifier allows 300 s"):
        doc.check_binding(**args, now=at + 301)  # type: ignore[arg-type]
    doc.check_binding(**args, now=at + 1800, max_age_s=3600)  # type: ignore[arg-type]
