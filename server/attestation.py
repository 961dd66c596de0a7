"""Produce attestation documents: ours (``docs/attestation.md``) and the ACI report.

:class:`AttestationService` holds what the claims are about (:class:`AttestedWorkload`: model
identity, TLS key, key-release receipt, canary outcome, collateral, fixed at boot; the runtime
builds it from its boot record) and the evidence providers.
:meth:`AttestationService.document` collects one evidence set answering a batch of client nonces
(or none: the cached, unchallenged document); :meth:`AttestationService.aci` one ACI report.
Collection is blocking I/O (configfs-tsm, NVML): :mod:`server.freshness` runs it in a worker
thread, one collection at a time, and decides which requests share one.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from attest.binding import document_device_nonce, pad_report_data
from attest.document import AttestationClaims, AttestationDocument, DeviceClaim, device_evidence_digest
from attest.evidence import Evidence
from attest.keysource.base import KeyReleaseReceipt
from attest.runconfig import RunConfiguration
from attest.tee.attester import Attester, DeviceAttester
from server.aci import aci_device_nonce, aci_report, aci_report_data, keyset_digest, workload_keyset

__all__ = ["AttestationService", "AttestedWorkload", "CanaryClaim"]

#: The runtime's name in the ``runtime`` claim.
RUNTIME_NAME = "enclave-serve"


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryClaim:
    """The canary generation's outcome before ready, as the documents claim it.

    ``passed``: the engine generated the packer's reference tokens (the other fields say which
    reference, rendered how, computed and served on what). ``not-recorded``: the model records no
    reference; nothing was checked. A failed canary never yields a document.
    """

    status: Literal["passed", "not-recorded"]
    tokens: int = 0
    reference_sha256: str = ""
    render: str = "prompt"
    reference_computed_on: str = ""
    served_on: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return the ``canary`` claim (``{"status": "not-recorded"}`` alone when not run)."""
        if self.status != "passed":
            return {"status": self.status}
        return {
            "status": self.status,
            "tokens": self.tokens,
            "reference_sha256": self.reference_sha256,
            "render": self.render,
            "reference_computed_on": self.reference_computed_on,
            "served_on": self.served_on,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestedWorkload:
    """What every document claims about this enclave, fixed once the boot is done.

    The attestation service's typed view of the runtime's boot record (:mod:`runtime.record`).
    """

    model_digest: str
    config: RunConfiguration
    tls_spki_sha256: str | None
    #: ``"<algorithm>:<hex>"`` of the CoCo init-data the runtime was launched with, or None.
    init_data: str | None = None
    #: The KBS's key-release receipt (None: the CDH or the file source, which give none).
    key_release: KeyReleaseReceipt | None = None
    runtime_version: str = "unknown"
    insecure_modes: tuple[str, ...] = ()
    canary: CanaryClaim = CanaryClaim(status="not-recorded")
    #: The collateral files given (``--collateral``), published as read: TEE name -> JSON.
    collateral: Mapping[str, Any] = field(default_factory=dict)
    #: The ACI keyset's ``not_after`` (None: a week after the service is made).
    keyset_not_after: int | None = None
    #: The ACI report's source provenance (None: all members null).
    source_provenance: Mapping[str, Any] | None = None


class AttestationService:
    """Build attestation documents bound to a client nonce.

    Raises (from :meth:`document`): :class:`foundation.errors.EvidenceCollectionError` when the
    hardware fails to produce evidence.
    """

    def __init__(
        self,
        workload: AttestedWorkload,
        *,
        attester: Attester,
        devices: Sequence[DeviceAttester] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._attester = attester
        self._devices = tuple(devices)
        self._model_digest = workload.model_digest
        self._config = workload.config
        self._init_data = workload.init_data
        self._tls_spki_sha256 = workload.tls_spki_sha256
        receipt = workload.key_release
        self._key_release = receipt.to_json() if receipt is not None else None
        self._runtime = {"name": RUNTIME_NAME, "version": workload.runtime_version}
        modes = list(workload.insecure_modes)
        if attester.insecure and not modes:
            modes.append(f"{attester.tee.value} TEE (evidence proves nothing)")
        modes += [f"{d.tee.value} device (evidence proves nothing)" for d in self._devices if d.insecure]
        self._insecure_modes = tuple(dict.fromkeys(modes))
        self._canary = workload.canary.to_json()
        self._collateral = dict(workload.collateral)
        self._clock = clock
        not_after = workload.keyset_not_after
        self._keyset_args: dict[str, Any] = {
            "not_after": not_after if not_after is not None else int(clock()) + 7 * 86400,
            "tls_spki_sha256": workload.tls_spki_sha256,
            "model_digest": workload.model_digest,
            "config_sha256": workload.config.sha256,
            "init_data": workload.init_data,
            "canary": self._canary,
            "insecure_modes": self._insecure_modes,
            "enclave_nonce": secrets.token_bytes(32),
        }
        # Filled on first use (it needs one device collection): see _bound_keyset.
        self._keyset: dict[str, Any] | None = None
        self._keyset_devices: tuple[Evidence, ...] = ()
        self._keyset_digest: str | None = None
        self._provenance = dict(
            workload.source_provenance
            or {"repo_url": None, "repo_commit": None, "image_digest": None, "image_provenance": None}
        )
        self._lock = threading.RLock()

    @property
    def insecure(self) -> bool:
        return bool(self._insecure_modes)

    @property
    def lock(self) -> threading.RLock:
        """Held while evidence is collected (the watchdog takes it too: one collection at a time).

        Re-entrant: the scheduler takes it first, then chooses which waiting nonces the collection
        answers, then calls :meth:`document` (which takes it again) in the same thread.
        """
        return self._lock

    @property
    def keyset_digest(self) -> str:
        """The ACI workload keyset digest (the ``X-ACI-Keyset-Digest`` header).

        The first call collects the device evidence the keyset binds (blocking I/O, under
        :attr:`lock`); the frontend makes it in its worker thread, with the first cached ACI
        report, before the server is ready, so the routes only read the stored value.

        Raises:
            EvidenceCollectionError: (first call only) a device failed to produce evidence.
        """
        digest = self._keyset_digest
        if digest is None:
            with self._lock:
                self._bound_keyset()
            digest = self._keyset_digest
            assert digest is not None
        return digest

    def _bound_keyset(self) -> tuple[dict[str, Any], tuple[Evidence, ...]]:
        """The keyset with its device evidence digests, collecting that evidence once (lock held).

        The devices sign :func:`attest.aci.aci_device_nonce` of the keyset built without them
        (it carries the enclave's random nonce, so it was unknown before this keyset existed).
        """
        if self._keyset is None:
            nonce = aci_device_nonce(workload_keyset(**self._keyset_args))
            devices = tuple(dev.collect(nonce) for dev in self._devices)
            keyset = workload_keyset(**self._keyset_args, devices=devices)
            self._keyset, self._keyset_devices = keyset, devices
            self._keyset_digest = keyset_digest(keyset)
        return self._keyset, self._keyset_devices

    def document(self, nonces: Sequence[bytes], *, max_age_s: int | None = None) -> AttestationDocument:
        """Collect fresh evidence whose report data commits to the claims answering ``nonces``.

        With ``max_age_s``, also the unchallenged document, usable without a nonce for that many
        seconds (required when ``nonces`` is empty): a cache refresh answers the nonces waiting
        beside it with the same evidence.

        Raises:
            EvidenceCollectionError: the hardware failed to produce evidence.
        """
        with self._lock:
            enclave_nonce = secrets.token_bytes(32)
            device_nonce = document_device_nonce(nonces, enclave_nonce)
            device_evidence = tuple(dev.collect(device_nonce) for dev in self._devices)
            claims = AttestationClaims(
                nonces=tuple(nonces),
                enclave_nonce=enclave_nonce,
                issued_at=int(self._clock()),
                max_age_s=max_age_s,
                canary=self._canary,
                tee=self._attester.tee,
                insecure_modes=self._insecure_modes,
                model_digest=self._model_digest,
                config_sha256=self._config.sha256,
                init_data=self._init_data,
                tls_spki_sha256=self._tls_spki_sha256,
                devices=tuple(
                    DeviceClaim(tee=ev.tee.value, evidence_sha384=device_evidence_digest(ev))
                    for ev in device_evidence
                ),
                key_release=self._key_release,
                runtime=self._runtime,
            )
            primary = self._attester.collect(claims.report_data())
            return AttestationDocument(
                claims=claims, primary=primary, devices=device_evidence, collateral=self._collateral
            )

    def aci(self, nonce: bytes | None) -> dict[str, Any]:
        """Collect evidence over the ACI statement for ``nonce`` (None: unchallenged); the report.

        The CPU evidence is fresh for ``nonce``; the device evidence is the keyset's, collected
        once over a nonce derived from the keyset and bound by its digests (:mod:`attest.aci`).

        Raises:
            EvidenceCollectionError: the hardware failed to produce evidence.
        """
        with self._lock:
            keyset, devices = self._bound_keyset()
            report_data = aci_report_data(keyset_digest(keyset), nonce)
            primary = self._attester.collect(pad_report_data(report_data))
        return aci_report(
            keyset=keyset,
            report_data=report_data,
            primary=primary,
            devices=devices,
            collateral=self._collateral,
            insecure_modes=self._insecure_modes,
            source_provenance=self._provenance,
        )
