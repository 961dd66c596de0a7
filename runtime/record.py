"""What each boot stage established, as typed frozen results, and the one record of them all.

Modelled on python-tuf's trust state: each stage of :mod:`runtime.boot` returns one result,
later stages read the results they depend on, and the ``serve`` stage gathers them into one
frozen :class:`BootRecord` that the attestation service (through :meth:`BootRecord.workload`)
and the watchdog read. Nothing here holds a secret: the model key lives only in the runtime,
between the ``key`` and the end of the ``load`` stage; :class:`KeyResult` keeps what is public
about its release.

::

    config  -> ConfigResult     the prepared inputs (model, resource, vLLM arguments, attested
                                configuration) and the TLS key's SPKI digest
    attest  -> EvidenceResult   the TEE's attester, the GPUs' attesters and their local gates
    key     -> KeyResult        where the key came from, and the KBS's receipt
    load    -> LoadResult       what each rank decrypted, how fast
    canary  -> CanaryResult     the canary claim and the stage's detail
    serve   -> CollateralResult the collateral files, read once (as published and typed)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attest.evidence import TeeKind
from attest.keysource.base import KeyRelease, KeyReleaseReceipt, KeySourceName
from attest.tee.attester import Attester, DeviceAttester, DeviceGate
from foundation.resource import ResourceUri
from loader.keyhandoff import LoadReport
from runtime.prepare import Prepared
from server.attestation import AttestedWorkload, CanaryClaim

__all__ = [
    "BootRecord",
    "CanaryResult",
    "CollateralResult",
    "ConfigResult",
    "EvidenceResult",
    "KeyResult",
    "LoadResult",
    "RankLoad",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigResult:
    """Stage ``config``: the typed inputs of every later stage."""

    prepared: Prepared
    #: The in-enclave TLS key's SPKI digest (stage ``tls``; None without TLS).
    tls_spki_sha256: str | None = None

    def detail(self) -> str:
        """The stage's one-line detail."""
        return f"model {self.prepared.model.digest}, config sha256:{self.prepared.configuration.sha256}"


@dataclass(frozen=True, slots=True, kw_only=True)
class EvidenceResult:
    """Stage ``attest``: who produces evidence, and what the GPUs' local gates established."""

    attester: Attester
    devices: tuple[DeviceAttester, ...] = ()
    #: One per device, in order: verified locally before any key was requested.
    gates: tuple[DeviceGate, ...] = ()

    def detail(self) -> str:
        """The stage's one-line detail."""
        return "; ".join([f"tee {self.attester.tee.value}", *(g.summary() for g in self.gates)])


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyResult:
    """Stage ``key``: the public part of the key release (never the key)."""

    source: KeySourceName
    resource: ResourceUri
    #: The KBS's receipt (None for the CDH and the file source).
    receipt: KeyReleaseReceipt | None = None
    insecure: bool = False

    @classmethod
    def from_release(cls, release: KeyRelease) -> KeyResult:
        """Keep what is public about ``release``."""
        return cls(
            source=release.source,
            resource=release.resource,
            receipt=release.receipt,
            insecure=release.insecure,
        )

    def detail(self) -> str:
        """The stage's one-line detail."""
        return f"key released by {self.source} for {self.resource}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RankLoad:
    """What one vLLM worker reported after decrypting its part of the model."""

    rank: int
    ciphertext_bytes: int
    gbps: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    """Stage ``load``: every rank's load statistics, by rank."""

    ranks: tuple[RankLoad, ...] = ()

    @classmethod
    def from_reports(cls, reports: Sequence[LoadReport]) -> LoadResult:
        """Read the workers' reports (their ``stats`` parsed once, here)."""
        return cls(
            ranks=tuple(
                RankLoad(
                    rank=r.rank,
                    ciphertext_bytes=int(r.stats.get("ciphertext_bytes", 0)),
                    gbps=float(r.stats.get("gbps", 0.0)),
                )
                for r in sorted(reports, key=lambda r: r.rank)
            )
        )

    @property
    def ciphertext_bytes(self) -> int:
        """The bytes decrypted by all ranks together."""
        return sum(r.ciphertext_bytes for r in self.ranks)

    @property
    def gbps(self) -> float:
        """The slowest rank's throughput (0.0 without ranks)."""
        return min((r.gbps for r in self.ranks), default=0.0)

    def detail(self, model_size: str) -> str:
        """The stage's one-line detail; ``model_size`` as the model describes it."""
        per_rank = ", ".join(
            f"rank {r.rank}: {r.ciphertext_bytes / 1e6:.3f} MB at {r.gbps:.2f} GB/s" for r in self.ranks
        )
        return f"{len(self.ranks)} rank(s) decrypted parts of {model_size}: {per_rank}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryResult:
    """Stage ``canary``: the claim the documents make, and the stage's detail."""

    claim: CanaryClaim
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CollateralResult:
    """Stage ``serve`` (first step): the ``--collateral`` files, read once.

    ``documents`` is what the documents publish (TEE name -> the file's JSON, as read); ``typed``
    the same parsed, for the watchdog's local verification.
    """

    documents: Mapping[str, Any] = field(default_factory=dict)
    typed: Mapping[TeeKind, object] = field(default_factory=dict)

    def for_tee(self, tee: TeeKind) -> object | None:
        """The parsed collateral for ``tee`` (None: none given)."""
        return self.typed.get(tee)


@dataclass(frozen=True, slots=True, kw_only=True)
class BootRecord:
    """Every stage's result: what the serving enclave is, fixed before it becomes ready."""

    config: ConfigResult
    evidence: EvidenceResult
    key: KeyResult
    load: LoadResult
    canary: CanaryResult
    collateral: CollateralResult

    def workload(
        self, *, runtime_version: str, insecure_modes: Sequence[str], keyset_not_after: int
    ) -> AttestedWorkload:
        """The attestation service's view: what every document claims about this enclave."""
        prepared = self.config.prepared
        return AttestedWorkload(
            model_digest=prepared.model.digest,
            config=prepared.configuration,
            init_data=None if prepared.init_data is None else prepared.init_data.digest_text,
            tls_spki_sha256=self.config.tls_spki_sha256,
            key_release=self.key.receipt,
            runtime_version=runtime_version,
            insecure_modes=tuple(insecure_modes),
            canary=self.canary.claim,
            collateral=self.collateral.documents,
            keyset_not_after=keyset_not_after,
        )
