"""Prometheus metrics of the enclave, under the ``enclave_serve_`` prefix.

They live in prometheus-client's default registry, the one vLLM's own ``/metrics`` exposes when
it runs one API server (ours), so one scrape of ``/metrics`` returns vLLM's serving metrics and
these. While booting (before vLLM's app exists) the boot app serves the same registry at
``/metrics``.

Nothing here carries a secret, a prompt or a client address: labels are fixed vocabularies
(stage names, request kinds, outcomes).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The enclave's metrics, registered once per registry (:meth:`default` for the global one)."""

    _default: Metrics | None = None

    @classmethod
    def default(cls) -> Metrics:
        """The metrics in prometheus-client's default registry (created on first use)."""
        if cls._default is None:
            cls._default = cls(REGISTRY)
        return cls._default

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else REGISTRY
        reg = self.registry
        self.boot_stage_seconds = Gauge(
            "enclave_serve_boot_stage_seconds",
            "Duration of each completed boot stage",
            ["stage"],
            registry=reg,
        )
        self.boot_failed = Gauge(
            "enclave_serve_boot_failed",
            "1 for the stage at which the boot (or serving) failed",
            ["stage"],
            registry=reg,
        )
        self.ready = Gauge("enclave_serve_ready", "1 while the enclave serves (readiness 200)", registry=reg)
        self.load_bytes = Gauge(
            "enclave_serve_load_bytes", "Ciphertext bytes the workers decrypted at boot", registry=reg
        )
        self.load_gbps = Gauge(
            "enclave_serve_load_gbps",
            "Decryption throughput of the slowest rank at boot (GB/s)",
            registry=reg,
        )
        self.attestation_requests = Counter(
            "enclave_serve_attestation_requests",
            "Attestation requests by kind (fresh, cached, aci-fresh, aci-cached) and outcome",
            ["kind", "outcome"],
            registry=reg,
        )
        self.attestation_latency = Histogram(
            "enclave_serve_attestation_latency_seconds",
            "Time to answer an attestation request that got a document",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.attestation_batch = Histogram(
            "enclave_serve_attestation_batch_nonces",
            "Client nonces answered by one fresh evidence collection",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=reg,
        )
        self.attestation_collect_seconds = Histogram(
            "enclave_serve_attestation_collect_seconds",
            "Time the hardware took to produce one evidence set",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.watchdog_checks = Counter(
            "enclave_serve_watchdog_checks", "Watchdog re-attestation rounds", registry=reg
        )
        self.watchdog_failures = Counter(
            "enclave_serve_watchdog_failures", "Watchdog rounds that found a change", registry=reg
        )
        self.canary = Gauge(
            "enclave_serve_canary",
            "Outcome of the canary generation before ready (1 for the outcome that happened)",
            ["outcome"],
            registry=reg,
        )
        self.canary_seconds = Gauge(
            "enclave_serve_canary_seconds", "Time the canary generation took", registry=reg
        )

    def stage_done(self, stage: str, seconds: float) -> None:
        self.boot_stage_seconds.labels(stage=stage).set(seconds)

    def stage_failed(self, stage: str) -> None:
        self.boot_failed.labels(stage=stage).set(1)
        self.ready.set(0)

    def loaded(self, stats: Mapping[str, float]) -> None:
        self.load_bytes.set(stats.get("ciphertext_bytes", 0.0))
        self.load_gbps.set(stats.get("gbps", 0.0))

    def canary_outcome(self, outcome: str, seconds: float | None = None) -> None:
        self.canary.labels(outcome=outcome).set(1)
        if seconds is not None:
            self.canary_seconds.set(seconds)
