"""Produce fresh attestation documents on request.

:class:`AttestationService` holds what the claims are about (model identity, TLS key,
key-release receipt) and the evidence providers; :meth:`AttestationService.document` collects
fresh evidence for one client nonce. Collection is blocking I/O (configfs-tsm, NVML), so the
HTTP route runs it in a worker thread and serialises requests (TDX/SNP report generation is
serialised by the kernel anyway).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from attest.binding import document_device_nonce
from attest.document import AttestationClaims, AttestationDocument, DeviceClaim, device_evidence_digest
from attest.providers.base import Attester, DeviceAttester
from attest.runconfig import RunConfiguration

__all__ = ["AttestationService"]


class AttestationService:
    """Build attestation documents bound to a client nonce.

    Raises (from :meth:`document`): :class:`attest.errors.EvidenceCollectionError` when the
    hardware fails to produce evidence.
    """

    def __init__(
        self,
        *,
        attester: Attester,
        devices: Sequence[DeviceAttester],
        model_digest: str,
        config: RunConfiguration,
        tls_spki_sha256: str | None,
        init_data: str | None = None,
        key_release: Mapping[str, Any] | None,
        runtime: Mapping[str, str],
        insecure_modes: Sequence[str] = (),
    ) -> None:
        self._attester = attester
        self._devices = tuple(devices)
        self._model_digest = model_digest
        self._config = config
        self._init_data = init_data
        self._tls_spki_sha256 = tls_spki_sha256
        self._key_release = dict(key_release) if key_release is not None else None
        self._runtime = dict(runtime)
        modes = list(insecure_modes)
        if attester.insecure and not modes:
            modes.append(f"{attester.tee.value} TEE (evidence proves nothing)")
        modes += [f"{d.tee.value} device (evidence proves nothing)" for d in self._devices if d.insecure]
        self._insecure_modes = tuple(dict.fromkeys(modes))
        self._lock = threading.Lock()

    @property
    def insecure(self) -> bool:
        return bool(self._insecure_modes)

    def document(self, nonce: bytes) -> AttestationDocument:
        """Collect fresh evidence whose report data commits to the claims for ``nonce``."""
        with self._lock:
            device_nonce = document_device_nonce(nonce)
            device_evidence = tuple(dev.collect(device_nonce) for dev in self._devices)
            claims = AttestationClaims(
                nonce=nonce,
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
            return AttestationDocument(claims=claims, primary=primary, devices=device_evidence)
