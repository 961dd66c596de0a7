"""Boot stages, their timings, and the one reason the runtime is not ready.

The runtime boots as explicit stages. :class:`BootStatus` records when each started and ended
and, on failure, the stage and the reason; the readiness probe and the boot-stage endpoint
render it as JSON. Reasons are operator-facing messages from :class:`foundation.errors.Error`,
which never contain secrets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.metrics import Metrics

__all__ = ["BootStatus", "Stage", "StageRecord"]


class Stage(StrEnum):
    """The boot stages, in order."""

    CONFIG = "config"  # parse configuration and the model manifest; check plaintext model files
    TLS = "tls"  # generate the in-enclave TLS key
    ATTEST = "attest"  # find the TEE and the GPUs
    KEY = "key"  # attest to the key broker, receive the model key, authenticate the manifest
    LOAD = "load"  # start vLLM; its workers decrypt the model into device memory
    CANARY = "canary"  # generate the packer's reference tokens through the served engine
    SERVE = "serve"  # the OpenAI API and attestation endpoints are live
    WATCHDOG = "watchdog"  # after ready: re-attestation found a change (the process then exits)


@dataclass(slots=True)
class StageRecord:
    stage: Stage
    started: float
    ended: float | None = None
    ok: bool | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage.value,
            "ok": self.ok,
            "seconds": None if self.ended is None else round(self.ended - self.started, 3),
            "detail": self.detail,
        }


class BootStatus:
    """Thread-safe record of the boot sequence."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._draining = False
        self._lock = threading.Lock()
        self._records: list[StageRecord] = []
        self._failure: tuple[Stage, str] | None = None
        self._ready = False
        self._started = clock()
        self.insecure_modes: list[str] = []
        #: The mount table the config stage checked (public form), for the boot report.
        self.mounts: list[dict[str, Any]] = []

    def begin(self, stage: Stage) -> None:
        with self._lock:
            self._records.append(StageRecord(stage=stage, started=self._clock()))

    def end(self, stage: Stage, detail: str = "") -> None:
        with self._lock:
            record = self._find(stage)
            record.ended = self._clock()
            record.ok = True
            record.detail = detail
        if self._metrics is not None:
            self._metrics.stage_done(stage.value, record.ended - record.started)

    def fail(self, stage: Stage, reason: str) -> None:
        with self._lock:
            try:
                record = self._find(stage)
            except LookupError:
                record = StageRecord(stage=stage, started=self._clock())
                self._records.append(record)
            record.ended = self._clock()
            record.ok = False
            record.detail = reason
            self._failure = (stage, reason)
            self._ready = False
        if self._metrics is not None:
            self._metrics.stage_failed(stage.value)

    def set_ready(self) -> None:
        with self._lock:
            self._ready = True
        if self._metrics is not None:
            self._metrics.ready.set(1)

    def drain(self) -> None:
        """Shutting down: readiness 503 (``draining``) while in-flight requests finish."""
        with self._lock:
            self._draining = True
        if self._metrics is not None:
            self._metrics.ready.set(0)

    @property
    def draining(self) -> bool:
        with self._lock:
            return self._draining

    def _find(self, stage: Stage) -> StageRecord:
        for record in reversed(self._records):
            if record.stage is stage:
                return record
        raise LookupError(stage)

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready

    @property
    def failed(self) -> bool:
        with self._lock:
            return self._failure is not None

    @property
    def current(self) -> Stage | None:
        with self._lock:
            return self._records[-1].stage if self._records else None

    def readiness(self) -> dict[str, Any]:
        """Return the readiness body: ``{"ready", "stage", "reason"}``."""
        with self._lock:
            if self._failure is not None:
                stage, reason = self._failure
                return {"ready": False, "status": "failed", "stage": stage.value, "reason": reason}
            if self._draining:
                return {
                    "ready": False,
                    "status": "draining",
                    "stage": Stage.SERVE.value,
                    "reason": "shutting down: in-flight requests are finishing, no new ones are taken",
                }
            if self._ready:
                return {"ready": True, "status": "ready", "stage": Stage.SERVE.value, "reason": ""}
            stage_name = self._records[-1].stage.value if self._records else "starting"
            return {
                "ready": False,
                "status": "booting",
                "stage": stage_name,
                "reason": f"booting: {stage_name}",
            }

    def to_json(self) -> dict[str, Any]:
        """Return every stage with its timing, for ``/.well-known/enclave-serve/boot``."""
        body = self.readiness()
        with self._lock:
            body["stages"] = [r.to_json() for r in self._records]
            body["uptime_seconds"] = round(self._clock() - self._started, 3)
            body["insecure_modes"] = list(self.insecure_modes)
            body["mounts"] = list(self.mounts)
        return body
