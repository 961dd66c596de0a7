"""Attestation that costs one quote: burst windows, refreshes and watchdog rounds, fair queueing."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import pytest

from attest.document import AttestationDocument
from attest.tee.sample.attester import UnsafeSampleAttester
from runtime.watchdog import Watchdog
from server.freshness import DocumentCache, EvidenceScheduler, QueueFull, client_group
from tests.server.test_attestation_document import SPKI, service


class CountingAttesterDouble(UnsafeSampleAttester):
    """Test double: the sample TEE, each quote taking ``delay`` s; counts quotes; can be held."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(allow_insecure=True)
        self.delay = delay
        self.quotes = 0
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def collect(self, report_data: bytes) -> Any:
        self.entered.set()
        self.release.wait(10)
        time.sleep(self.delay)
        self.quotes += 1
        return super().collect(report_data)


def nonce(i: int) -> bytes:
    return i.to_bytes(32, "big")


def verify(doc: AttestationDocument, n: bytes) -> None:
    doc.check_binding(nonce=n, observed_tls_spki_sha256=SPKI, expected_model_digest=None, allow_insecure=True)


def test_the_burst_window_gathers_a_burst_into_one_collection() -> None:
    """32 requests arriving over 20 ms (the first finds the collector idle) share one quote."""
    attester = CountingAttesterDouble(delay=0.2)
    svc = service(attester=attester)

    async def go() -> tuple[list[AttestationDocument], dict[str, int], float]:
        scheduler = EvidenceScheduler(svc)
        scheduler._last_collect_s = 1.0  # a slow quote was seen: the window is its maximum (50 ms)
        scheduler.start()
        try:

            async def one(i: int) -> AttestationDocument:
                await asyncio.sleep(i * 0.02 / 32)  # arrivals spread over 20 ms
                return await scheduler.document(nonce(i), client=f"127.0.0.{i}")

            started = time.monotonic()
            docs = await asyncio.gather(*(one(i) for i in range(32)))
            return docs, dict(scheduler.collections), time.monotonic() - started
        finally:
            await scheduler.stop()

    docs, collections, elapsed = asyncio.run(go())
    for i, doc in enumerate(docs):
        verify(doc, nonce(i))
    assert collections == {"document": 1} and attester.quotes == 1
    assert len(docs[0].claims.nonces) == 32
    assert elapsed < 0.2 + 0.05 + 0.15  # one quote, the window, scheduling slack


def test_without_a_window_the_first_request_would_be_collected_alone() -> None:
    """The contrast: a zero window collects the first arrival alone, the rest in a second quote."""
    attester = CountingAttesterDouble(delay=0.2)

    async def go() -> dict[str, int]:
        scheduler = EvidenceScheduler(service(attester=attester), window_max_s=0.0)
        scheduler.start()
        try:

            async def one(i: int) -> AttestationDocument:
                await asyncio.sleep(i * 0.02 / 32)
                return await scheduler.document(nonce(i))

            await asyncio.gather(*(one(i) for i in range(32)))
            return dict(scheduler.collections)
        finally:
            await scheduler.stop()

    assert asyncio.run(go()) == {"document": 2}


def test_a_cache_refresh_in_progress_answers_the_nonces_waiting_in_the_next_collection_at_once() -> None:
    """Nonces that arrive while a refresh holds the hardware all go in one collection right after."""
    attester = CountingAttesterDouble()
    svc = service(attester=attester)

    async def go() -> tuple[list[AttestationDocument], dict[str, int], float]:
        scheduler = EvidenceScheduler(svc)
        scheduler.start()
        cache = DocumentCache(scheduler, max_age_s=60)
        try:
            attester.release.clear()
            attester.entered.clear()
            refresh = asyncio.create_task(cache.refresh())
            await asyncio.to_thread(attester.entered.wait, 5)  # the refresh's quote is under way
            waiting = [
                asyncio.create_task(scheduler.document(nonce(i), client=f"10.0.0.{i}")) for i in range(20)
            ]
            await asyncio.sleep(0.1)  # longer than any window: they are all waiting
            released = time.monotonic()
            attester.release.set()
            docs = await asyncio.gather(*waiting)
            after = time.monotonic() - released
            await refresh
            return docs, dict(scheduler.collections), after
        finally:
            await scheduler.stop()

    docs, collections, after = asyncio.run(go())
    for i, doc in enumerate(docs):
        verify(doc, nonce(i))
    assert collections == {"cached-document": 1, "document": 1, "cached-aci": 1}
    assert len(docs[0].claims.nonces) == 20 and after < 0.5


def test_a_watchdog_round_in_progress_answers_the_nonces_waiting_in_the_next_collection() -> None:
    """The watchdog shares the service's lock: what waits during its round is one collection."""
    attester = CountingAttesterDouble()
    svc = service(attester=attester)
    watchdog = Watchdog(attester=attester, devices=[], expected_gpus=None, interval_s=60, lock=svc.lock)

    async def go() -> tuple[list[AttestationDocument], dict[str, int]]:
        scheduler = EvidenceScheduler(svc)
        scheduler.start()
        try:
            attester.release.clear()
            attester.entered.clear()
            round_ = asyncio.create_task(asyncio.to_thread(watchdog.check))
            await asyncio.to_thread(attester.entered.wait, 5)
            first = asyncio.create_task(scheduler.document(nonce(0)))
            await asyncio.sleep(0.1)  # its window is over: it is waiting for the lock
            rest = [asyncio.create_task(scheduler.document(nonce(i), client=str(i))) for i in range(1, 16)]
            await asyncio.sleep(0.05)
            attester.release.set()
            docs = await asyncio.gather(first, *rest)
            await round_
            return docs, dict(scheduler.collections)
        finally:
            await scheduler.stop()

    docs, collections = asyncio.run(go())
    for i, doc in enumerate(docs):
        verify(doc, nonce(i))
    assert collections == {"document": 1} and watchdog.rounds == 1
    assert attester.quotes == 2  # the watchdog's and the one collection for all 16


def test_an_aci_refresh_waits_for_a_lull_while_its_entry_is_young() -> None:
    """An ACI refresh (its own collection) with time to spare does not go before verifiers that
    keep coming."""
    attester = CountingAttesterDouble(delay=0.05)

    async def go() -> list[str]:
        scheduler = EvidenceScheduler(service(attester=attester), quiet_s=0.3)
        scheduler.start()
        order: list[str] = []
        try:

            async def refresh() -> None:
                await scheduler.cached_aci(wait_s=30)
                order.append("refresh")

            async def verifier(i: int) -> None:
                await scheduler.document(nonce(i))
                order.append("fresh")

            task = asyncio.create_task(refresh())
            for i in range(5):  # a request every 0.1 s: no lull of 0.3 s
                await verifier(i)
                await asyncio.sleep(0.1)
            await task
            return order
        finally:
            await scheduler.stop()

    assert asyncio.run(go()) == ["fresh"] * 5 + ["refresh"]


def test_a_document_refresh_rides_along_with_the_verifiers_collection() -> None:
    """A document refresh waiting beside verifiers is answered by their collection: the cache gets
    a document that states its maximum age and answers their nonces, and no quote of its own."""
    attester = CountingAttesterDouble(delay=0.05)

    async def go() -> tuple[AttestationDocument, list[AttestationDocument], dict[str, int]]:
        scheduler = EvidenceScheduler(service(attester=attester), quiet_s=30)
        scheduler.start()
        try:
            attester.release.clear()
            attester.entered.clear()
            first = asyncio.create_task(scheduler.document(nonce(100)))
            await asyncio.to_thread(attester.entered.wait, 5)  # a collection is under way
            refresh = asyncio.create_task(scheduler.cached_document(wait_s=30))
            waiting = [asyncio.create_task(scheduler.document(nonce(i), client=str(i))) for i in range(3)]
            await asyncio.sleep(0.05)
            attester.release.set()
            docs = await asyncio.gather(*waiting)
            await first
            return await refresh, docs, dict(scheduler.collections)
        finally:
            await scheduler.stop()

    cached, docs, collections = asyncio.run(go())
    assert collections == {"document": 2} and attester.quotes == 2  # the one under way, then one for all
    assert cached is docs[0] and cached.claims.max_age_s == 60 and len(cached.claims.nonces) == 3
    for i, doc in enumerate(docs):
        verify(doc, nonce(i))
    cached.check_binding(
        nonce=None, observed_tls_spki_sha256=SPKI, expected_model_digest=None, allow_insecure=True
    )


def test_a_watchdog_round_answers_the_nonces_waiting_beside_it() -> None:
    """A round goes first and its document answers the verifiers waiting: with a collection in
    progress, a round and 15 verifiers waiting cost one quote more, not two."""
    attester = CountingAttesterDouble()
    svc = service(attester=attester)

    async def go() -> tuple[list[AttestationDocument], dict[str, int], int]:
        scheduler = EvidenceScheduler(svc)
        watchdog = Watchdog(
            attester=attester, devices=[], expected_gpus=None, interval_s=60, lock=svc.lock,
            documents=scheduler.watchdog_document,
        )  # fmt: skip
        scheduler.start()
        try:
            attester.release.clear()
            attester.entered.clear()
            first = asyncio.create_task(scheduler.document(nonce(0)))
            await asyncio.to_thread(attester.entered.wait, 5)  # its collection is under way
            rest = [asyncio.create_task(scheduler.document(nonce(i), client=str(i))) for i in range(1, 16)]
            round_ = asyncio.create_task(watchdog.round())
            await asyncio.sleep(0.1)
            attester.release.set()
            docs = await asyncio.gather(first, *rest)
            await round_
            return docs, dict(scheduler.collections), watchdog.rounds
        finally:
            await scheduler.stop()

    docs, collections, rounds = asyncio.run(go())
    for i, doc in enumerate(docs):
        verify(doc, nonce(i))
    assert collections == {"document": 1, "watchdog": 1} and rounds == 1
    assert attester.quotes == 2 and len(docs[1].claims.nonces) == 16  # 15 verifiers and the round


def flood_and_verify(
    scheduler: EvidenceScheduler, attackers: int, depth: int, attester: CountingAttesterDouble | None = None
) -> tuple[int, int, list[int]]:
    """``attackers`` groups each keep ``depth`` requests outstanding (again as soon as answered,
    or 1 ms after a refusal: a client across a network, not a loop inside the server); a verifier
    from another group asks 10 times. Returns (verifier refusals, attacker refusals, the quotes
    each answered verifier request waited for: counted, not timed, so a loaded machine does not
    change it)."""

    async def go() -> tuple[int, int, list[int]]:
        scheduler.start()
        refused = {"attacker": 0, "verifier": 0}
        stop = asyncio.Event()

        async def attacker(client: str, k: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    await scheduler.document(f"{client}/{k}/{i}".encode().ljust(32, b"."), client=client)
                except QueueFull:
                    refused["attacker"] += 1
                    await asyncio.sleep(0.001)

        tasks = [
            asyncio.create_task(attacker(f"198.51.100.{a}", k))
            for a in range(attackers)
            for k in range(depth)
        ]
        waited: list[int] = []
        try:
            await asyncio.sleep(0.3)  # the queue is full (the attackers are being refused)
            for i in range(10):
                before = 0 if attester is None else attester.quotes
                try:
                    await scheduler.document(nonce(10_000 + i), client="203.0.113.7")
                    waited.append(0 if attester is None else attester.quotes - before)
                except QueueFull:
                    refused["verifier"] += 1
                await asyncio.sleep(0.013)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await scheduler.stop()
        return refused["verifier"], refused["attacker"], waited

    return asyncio.run(go())


def test_many_addresses_filling_the_queue_do_not_shut_a_verifier_out() -> None:
    """16 flooding addresses, 16 requests outstanding each (256 for 64 places): the verifier is
    admitted every time and answered within two collections (the one under way and its own)."""
    attester = CountingAttesterDouble(delay=0.05)
    scheduler = EvidenceScheduler(service(attester=attester), max_batch=32)
    verifier_refused, attacker_refused, waited = flood_and_verify(
        scheduler, attackers=16, depth=16, attester=attester
    )
    assert verifier_refused == 0 and attacker_refused > 0
    assert max(waited) <= 2, waited  # the collection under way, then its own


def test_a_queue_without_the_fair_share_rule_shuts_the_verifier_out() -> None:
    """The contrast, measured on the same flood: first come first served refuses the verifier."""

    class FirstComeScheduler(EvidenceScheduler):
        def _admit(self, request: Any) -> None:
            if len(self._queue) >= self.max_pending:
                raise QueueFull(len(self._queue), 1)
            self._queue.append(request)

    scheduler = FirstComeScheduler(service(attester=CountingAttesterDouble(delay=0.05)), max_batch=32)
    verifier_refused, _, _ = flood_and_verify(scheduler, attackers=16, depth=16)
    assert verifier_refused >= 8


@pytest.mark.parametrize(
    ("host", "group"),
    [
        ("127.0.0.10", "127.0.0.10"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("testclient", "testclient"),
    ],
)
def test_clients_are_grouped_by_ipv4_address_and_ipv6_64(host: str, group: str) -> None:
    assert client_group(host) == group


def test_an_unread_aci_report_is_refreshed_only_in_a_lull_and_a_request_for_a_lapsed_one_gets_it() -> None:
    """Under steady fresh traffic a cache refresh costs verifiers no quote: the document rides
    along with theirs and an ACI report nobody read waits for a lull. A request that then finds
    no live ACI report gets one collected next."""
    attester = CountingAttesterDouble(delay=0.02)

    async def go() -> tuple[dict[str, int], dict[str, int], bool]:
        scheduler = EvidenceScheduler(service(attester=attester), quiet_s=0.5)
        scheduler.start()
        cache = DocumentCache(scheduler, max_age_s=60)
        try:
            await cache.refresh()  # as at start: both forms collected
            cache.start()
            for i in range(3):  # a verifier asking again as soon as it is answered: no lull
                verifier = asyncio.create_task(scheduler.document(nonce(i)))
                if i == 1:
                    await cache.refresh(in_lull=True)
                await verifier
            during = dict(scheduler.collections)
            assert cache.aci is not None
            cache.aci = dataclasses.replace(cache.aci, expires=0.0)  # lapsed
            assert cache.current("aci") is None  # 503 for this request; one is collected next
            for _ in range(100):
                await asyncio.sleep(0.01)
                if cache.current("aci") is not None:
                    break
            return during, dict(scheduler.collections), cache.aci_read
        finally:
            await cache.stop()
            await scheduler.stop()

    during, after, read = asyncio.run(go())
    assert during == {"cached-document": 1, "cached-aci": 1, "document": 3}  # start, then riding along
    assert after == {**during, "cached-aci": 2} and read
