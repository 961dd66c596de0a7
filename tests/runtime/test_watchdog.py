"""The watchdog: re-attestation rounds, and the first change ends serving."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from prometheus_client import CollectorRegistry

from attest.tee.attester import DeviceAttester, DeviceGate
from attest.tee.sample.attester import UnsafeSampleAttester, UnsafeSampleDeviceAttester
from attest.tee.sample.evidence import SampleDeviceEvidence
from attest.tee.select import gate_device
from foundation.errors import AttestationError, VerificationError
from foundation.logs import JsonFormatter, set_stage_provider
from runtime.watchdog import Watchdog
from server.metrics import Metrics


class FailingDeviceAttesterDouble(UnsafeSampleDeviceAttester):
    """Test double: a device whose evidence (one per gate run) comes ``passes`` times, then finds
    the GPU gone."""

    def __init__(self, passes: int) -> None:
        super().__init__(allow_insecure=True)
        self.passes = passes
        self.calls = 0

    def collect(self, runtime_data: bytes) -> SampleDeviceEvidence:
        self.calls += 1
        if self.calls > self.passes:
            raise VerificationError("GPU 0 (GPU-test) is no longer in confidential-computing mode")
        return super().collect(runtime_data)


def watchdog(device: UnsafeSampleDeviceAttester, registry: CollectorRegistry, **kw: object) -> Watchdog:
    return Watchdog(
        attester=UnsafeSampleAttester(allow_insecure=True),
        devices=[device],
        expected_gpus=None,
        interval_s=0.01,
        metrics=Metrics(registry),
        **kw,  # type: ignore[arg-type]
    )


def test_rounds_pass_until_a_device_changes_then_the_reason_is_reported_once() -> None:
    registry = CollectorRegistry()
    device = FailingDeviceAttesterDouble(passes=2)
    dog = watchdog(device, registry)
    reasons: list[str] = []
    asyncio.run(asyncio.wait_for(dog.run(reasons.append), timeout=10))
    assert dog.rounds == 2 and device.calls == 3
    assert reasons == ["re-attestation failed: GPU 0 (GPU-test) is no longer in confidential-computing mode"]
    assert registry.get_sample_value("enclave_serve_watchdog_checks_total") == 3
    assert registry.get_sample_value("enclave_serve_watchdog_failures_total") == 1


def test_the_keyset_expiry_ends_serving() -> None:
    dog = watchdog(UnsafeSampleDeviceAttester(allow_insecure=True), CollectorRegistry(), expires_at=100.0)
    dog._clock = lambda: 99.0  # type: ignore[method-assign]
    dog.check()
    dog._clock = lambda: 100.0  # type: ignore[method-assign]
    with pytest.raises(AttestationError, match="not_after"):
        dog.check()


def test_evidence_that_stops_binding_fails_the_round() -> None:
    class WrongReportData(UnsafeSampleAttester):
        def collect(self, report_data: bytes):  # type: ignore[no-untyped-def]
            return super().collect(bytes(64))

    dog = Watchdog(
        attester=WrongReportData(allow_insecure=True), devices=[], expected_gpus=None, interval_s=1
    )
    with pytest.raises(AttestationError):
        dog.check()


def test_a_round_through_the_scheduler_checks_its_nonce_and_the_documents_evidence() -> None:
    """While serving, a round takes its evidence from an attestation document: the document must
    answer the round's nonce, and its evidence must bind the document's claims."""
    from server.freshness import EvidenceScheduler
    from tests.server.test_attestation_document import service

    class WrongReportData(UnsafeSampleAttester):
        def collect(self, report_data: bytes):  # type: ignore[no-untyped-def]
            return super().collect(bytes(64))

    async def one_round(attester: UnsafeSampleAttester, answer_other: bool = False) -> Watchdog:
        scheduler = EvidenceScheduler(service(attester=attester))
        scheduler.start()

        async def documents(nonce: bytes):  # type: ignore[no-untyped-def]
            return await scheduler.watchdog_document(bytes(32) if answer_other else nonce)

        dog = Watchdog(attester=attester, devices=[], expected_gpus=None, interval_s=1, documents=documents)
        try:
            await dog.round()
        finally:
            await scheduler.stop()
        return dog

    assert asyncio.run(one_round(UnsafeSampleAttester(allow_insecure=True))).rounds == 1
    with pytest.raises(AttestationError, match="does not answer its nonce"):
        asyncio.run(one_round(UnsafeSampleAttester(allow_insecure=True), answer_other=True))
    with pytest.raises(AttestationError):
        asyncio.run(one_round(WrongReportData(allow_insecure=True)))


def test_json_log_lines_carry_the_stage_and_no_traceback_text() -> None:
    set_stage_provider(lambda: "canary")
    try:
        try:
            raise ValueError("secret-looking detail")
        except ValueError:
            record = logging.LogRecord(
                "runtime.boot", logging.ERROR, __file__, 1, "boot failed: %s", ("x",), None
            )
            import sys

            record.exc_info = sys.exc_info()
        line = JsonFormatter().format(record)
    finally:
        set_stage_provider(lambda: None)
    body = json.loads(line)
    assert "\n" not in line
    assert body["stage"] == "canary" and body["message"] == "boot failed: x" and body["level"] == "error"
    assert body["exc_type"] == "ValueError" and "secret-looking" not in line


class ChangingGateDouble:
    """Test double of the device gate: the real sample gate, reporting a GPU UUID that changes
    after boot (a swapped GPU that still verifies)."""

    def __init__(self) -> None:
        self.uuid = "GPU-boot"

    def __call__(
        self, device: DeviceAttester, *, expected_count: int | None = None, recheck: bool = False
    ) -> DeviceGate:
        gate = gate_device(device, expected_count=expected_count, recheck=recheck)
        return DeviceGate(tee=gate.tee, devices=1, steps=gate.steps, facts={"gpus": [{"uuid": self.uuid}]})


def test_a_device_that_still_verifies_but_changed_since_boot_fails_the_round() -> None:
    device = UnsafeSampleDeviceAttester(allow_insecure=True)
    gate = ChangingGateDouble()
    boot = gate(device)
    dog = watchdog(device, CollectorRegistry(), baseline=[boot], gate=gate)
    dog.check()
    gate.uuid = "GPU-swapped"
    with pytest.raises(AttestationError, match=r"changed since boot.*GPU-swapped"):
        dog.check()


def test_a_stalled_round_counts_as_a_failure() -> None:
    class StallingDeviceAttesterDouble(UnsafeSampleDeviceAttester):
        """Test double: a device whose evidence for a re-check never comes in time."""

        def collect(self, runtime_data: bytes) -> SampleDeviceEvidence:
            import time

            time.sleep(0.5)
            return super().collect(runtime_data)

    dog = watchdog(StallingDeviceAttesterDouble(allow_insecure=True), CollectorRegistry())
    dog.timeout_s = 0.05
    reasons: list[str] = []
    asyncio.run(asyncio.wait_for(dog.run(reasons.append), timeout=10))
    assert reasons == ["re-attestation did not finish within 0 s"]
