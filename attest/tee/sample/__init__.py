"""The sample TEEs (``sample`` and ``sampledevice``): Trustee-compatible evidence that nothing
signs, for development on machines without a TEE.

.. warning::
   Both prove nothing. Every use needs an explicit development flag, the verifier refuses them
   unless told otherwise, and the attestation document says so.

Modules: :mod:`~attest.tee.sample.evidence` (the evidence models), :mod:`~attest.tee.sample.verifier`
and :mod:`~attest.tee.sample.claims`, :mod:`~attest.tee.sample.attester`. :data:`BACKEND` and
:data:`DEVICE_BACKEND` are what the registry (:mod:`attest.tee`) lists.
"""

from __future__ import annotations

from typing import Any

from attest.evidence import Evidence, TeeKind
from attest.tee.attester import Attester, DeviceAttester, DeviceGate
from attest.tee.base import InitDataRegister, TeeBackend
from attest.tee.sample.claims import SampleClaims
from attest.tee.sample.evidence import SAMPLE_INIT_DATA_SIZE, SampleDeviceEvidence, SampleEvidence
from attest.tee.sample.verifier import SampleDeviceVerifier, SampleVerifier

__all__ = ["BACKEND", "DEVICE_BACKEND"]


def _attester() -> type[Attester]:
    from attest.tee.sample.attester import UnsafeSampleAttester

    return UnsafeSampleAttester


def _device_attester() -> type[DeviceAttester]:
    from attest.tee.sample.attester import UnsafeSampleDeviceAttester

    return UnsafeSampleDeviceAttester


def _gate(attester: DeviceAttester, **options: Any) -> DeviceGate:
    from attest.tee.sample.gate import gate

    return gate(attester, **options)


def _read_register(attester: Attester, nonce: bytes, **options: Any) -> bytes:
    from attest.tee.sample.attester import sample_init_data_register

    return sample_init_data_register(attester, nonce)


def _fields(ev: Evidence) -> dict[str, Any]:
    assert isinstance(ev, SampleEvidence | SampleDeviceEvidence)
    return {"type": ev.tee.value, "svn": ev.svn, "report_data": ev.report_data.hex(), "insecure": True}


def _of_claims(claims: object) -> bytes | None:
    return claims.init_data if isinstance(claims, SampleClaims) else None


BACKEND = TeeBackend(
    kind=TeeKind.SAMPLE,
    title="sample TEE (INSECURE, development only)",
    insecure=True,
    evidence_type=SampleEvidence,
    evidence_from_json=SampleEvidence.from_json,
    verifier=SampleVerifier(),
    claims_type=SampleClaims,
    fields=_fields,
    attester=_attester,
    init_data=InitDataRegister(
        name="init_data", size=SAMPLE_INIT_DATA_SIZE, of_claims=_of_claims, read=_read_register
    ),
    aci_tee_type="enclave-serve-sample-insecure",
)

DEVICE_BACKEND = TeeBackend(
    kind=TeeKind.SAMPLE_DEVICE,
    title="sample device (INSECURE, development only)",
    device=True,
    insecure=True,
    evidence_type=SampleDeviceEvidence,
    evidence_from_json=SampleDeviceEvidence.from_json,
    verifier=SampleDeviceVerifier(),
    claims_type=SampleClaims,
    fields=_fields,
    attester=_device_attester,
    gate=_gate,
)
