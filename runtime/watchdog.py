"""After ready: re-attest on an interval, and stop serving on any change.

Each round (in a worker thread, so serving goes on):

1. every device re-runs its gate (:func:`attest.tee.select.gate_device` with ``recheck``):
   the GPUs are still on the bus and counted, in CC mode, still ready, and fresh evidence over a
   random nonce verifies locally; and they are the *same* GPUs in the same state as at boot (the
   gate's identity facts: count, UUIDs, architectures, PCI addresses, CC settings);
2. the TEE still produces evidence over a fresh random nonce, and it verifies locally
   (with the collateral the runtime carries; a TEE whose collateral is not available here is
   checked for collection and binding only, and the round says so once in the log);
3. the attested keyset has not reached its ``not_after`` (the ACI report's expiry).

A round that does not finish within ``max(30 s, interval)`` counts as failed (the host controls
the quoting service and could otherwise stall the watchdog forever). The device checks hold the
attestation service's collection lock, so they never run beside a document's collection. While
serving, the TEE's evidence comes through the attestation scheduler
(:meth:`server.freshness.EvidenceScheduler.watchdog_document`): an attestation document that goes
before the verifiers waiting and answers their nonces too, so a round costs them no quote of
their own; the round checks that the document answers its nonce and verifies its evidence over
the document's report data. A failed round is
final: the runtime flips readiness to 503 with the reason (stage
``watchdog``) and exits non-zero so the orchestrator replaces the pod. Nothing is retried: a GPU
that stops attesting mid-flight is exactly what this is for.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from attest.document import AttestationDocument
from attest.evidence import Evidence
from attest.tee.attester import Attester, DeviceAttester, DeviceGate
from attest.tee.select import gate_device
from foundation.errors import AttestationError, Error, VerificationUnavailable
from server.metrics import Metrics

__all__ = ["Watchdog"]

logger = logging.getLogger(__name__)


class Watchdog:
    """Re-attestation rounds every ``interval_s`` seconds."""

    def __init__(
        self,
        *,
        attester: Attester,
        devices: Sequence[DeviceAttester],
        expected_gpus: int | None,
        interval_s: float,
        collateral: object | None = None,
        expires_at: float | None = None,
        baseline: Sequence[DeviceGate] = (),
        lock: threading.Lock | threading.RLock | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        documents: Callable[[bytes], Awaitable[AttestationDocument]] | None = None,
        gate: Callable[..., DeviceGate] = gate_device,
    ) -> None:
        """``documents``: where a round gets the TEE's evidence while serving (the attestation
        scheduler's :meth:`~server.freshness.EvidenceScheduler.watchdog_document`); without it the
        round collects its own. ``gate`` runs a device's gate, called as
        ``gate(device, expected_count=..., recheck=True)`` (:func:`attest.tee.select.gate_device`;
        a test passes a double)."""
        self._gate = gate
        self._attester = attester
        self._documents = documents
        self._devices = tuple(devices)
        self._expected = expected_gpus
        self.interval_s = interval_s
        self._collateral = collateral
        self._metrics = metrics
        self._warned_unavailable = False
        self._expires_at = expires_at
        self._baseline = [_identity(gate) for gate in baseline]
        self._lock: threading.Lock | threading.RLock = lock or threading.Lock()
        self.timeout_s = max(30.0, interval_s)
        self._clock = clock
        self.rounds = 0

    def check(self) -> None:
        """Run one round collecting its own evidence (blocking).

        Raises :class:`foundation.errors.Error` naming what changed.
        """
        with self._lock:
            self._check_devices()
            report_data = secrets.token_bytes(64)
            self._verify(self._attester.collect(report_data), report_data)
        self.rounds += 1

    async def round(self) -> None:
        """Run one round from the event loop: checks in a worker thread, the TEE's evidence through
        ``documents`` when given. Raises :class:`foundation.errors.Error` naming what changed."""
        if self._documents is None:
            await asyncio.to_thread(self.check)
            return
        await asyncio.to_thread(self._locked_device_checks)
        nonce = secrets.token_bytes(32)
        document = await self._documents(nonce)
        if nonce not in document.claims.nonces:
            raise AttestationError("the TEE's evidence for this round does not answer its nonce")
        await asyncio.to_thread(self._verify, document.primary, document.claims.report_data())
        self.rounds += 1

    def _locked_device_checks(self) -> None:
        with self._lock:
            self._check_devices()

    def _check_devices(self) -> None:
        if self._expires_at is not None and self._clock() >= self._expires_at:
            raise AttestationError(
                "the attested keyset (TLS key) reached its not_after; restart for a fresh one"
            )
        for i, device in enumerate(self._devices):
            gate = self._gate(device, expected_count=self._expected, recheck=True)
            if i < len(self._baseline) and _identity(gate) != self._baseline[i]:
                before, now = self._baseline[i], _identity(gate)
                raise AttestationError(f"the {gate.tee.value} devices changed since boot: {before} -> {now}")

    def _verify(self, evidence: Evidence, report_data: bytes) -> None:
        from attest.verify import verify_evidence

        try:
            verify_evidence(
                evidence,
                expected_report_data=report_data,
                collateral=self._collateral,
                allow_insecure=self._attester.insecure,
            )
        except VerificationUnavailable as exc:
            if not self._warned_unavailable:
                logger.warning(
                    "watchdog: %s evidence collected but not verified here: %s", evidence.tee.value, exc
                )
                self._warned_unavailable = True

    async def run(self, on_failure: Callable[[str], None]) -> None:
        """Run rounds until cancelled or one fails (then call ``on_failure(reason)`` and return)."""
        while True:
            await asyncio.sleep(self.interval_s)
            if self._metrics is not None:
                self._metrics.watchdog_checks.inc()
            try:
                await asyncio.wait_for(self.round(), timeout=self.timeout_s)
            except TimeoutError:
                if self._metrics is not None:
                    self._metrics.watchdog_failures.inc()
                on_failure(f"re-attestation did not finish within {self.timeout_s:.0f} s")
                return
            except Exception as exc:
                if self._metrics is not None:
                    self._metrics.watchdog_failures.inc()
                reason = str(exc) if isinstance(exc, Error) else f"internal error ({type(exc).__name__})"
                if not isinstance(exc, Error):
                    logger.exception("watchdog round failed")
                on_failure(f"re-attestation failed: {reason}")
                return


def _identity(gate: DeviceGate) -> dict[str, Any]:
    """What must not change between the boot gate and a watchdog round."""
    facts = gate.facts
    cc = facts.get("cc")
    if isinstance(cc, dict):  # the ready state is set by the boot gate itself; recheck demands it
        cc = {k: v for k, v in cc.items() if k != "gpus_ready"}
    return {
        "tee": gate.tee.value,
        "devices": gate.devices,
        "gpus": facts.get("gpus"),
        "cc": cc,
        "pci_gpus": facts.get("pci_gpus"),
    }
