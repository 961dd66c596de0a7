"""Build the draft vendor-neutral Attested Confidential Inference report (``aci/1``), served beside ours.

ACI (dstack's draft spec, ``Dstack-TEE/private-ai-gateway spec/aci.md``) lets aggregators list
a confidential inference server without custom code. The binding (keyset digest, statement,
report data, the device nonce) and the report's typed, checked form live in :mod:`attest.aci`,
shared with the user's verifier; this module assembles the keyset and the response body.

What enclave-serve adds to the spec, inside the keyset (so bound by its digest): an
``enclave_serve`` member with the model identity (the manifest digest), the SHA-256 of the run
configuration, the init-data digest, the canary outcome, every insecure development mode, an
enclave nonce, and the SHA-384 of each device (GPU) evidence object, collected once per keyset
over :func:`attest.aci.aci_device_nonce`. What it leaves out: receipts (``/v1/aci/receipts``),
E2EE keys and sessions (a direct service has none); the keyset lists no receipt-signing key, so
a strict ACI client that requires receipts will not accept this server yet.

Pure functions: nothing here collects evidence or opens a connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attest.aci import (
    ACI_PURPOSE,
    ACI_TEE_TYPES,
    ACI_VERSION,
    AciWorkload,
    aci_device_nonce,
    aci_report_data,
    aci_statement,
    device_claims,
    keyset_digest,
)
from attest.evidence import Evidence

__all__ = [
    "ACI_PURPOSE",
    "ACI_VERSION",
    "aci_device_nonce",
    "aci_report",
    "aci_report_data",
    "aci_statement",
    "keyset_digest",
    "workload_keyset",
]


def workload_keyset(
    *,
    not_after: int,
    tls_spki_sha256: str | None,
    model_digest: str,
    config_sha256: str,
    init_data: str | None,
    canary: Mapping[str, Any] | None,
    insecure_modes: Sequence[str],
    enclave_nonce: bytes,
    devices: Sequence[Evidence] = (),
    subject: str | None = None,
) -> dict[str, Any]:
    """Return the workload keyset: the TLS key, plus the ``enclave_serve`` workload member.

    Build it first with ``devices=()``, collect each device's evidence over
    :func:`attest.aci.aci_device_nonce` of that keyset, then build it again with the evidence:
    the nonce is the same for both (it is derived with the device list empty).
    """
    workload = AciWorkload(
        model=model_digest,
        config_sha256=config_sha256,
        init_data=init_data,
        canary="not-recorded" if canary is None else str(canary.get("status")),
        insecure_modes=tuple(insecure_modes),
        enclave_nonce=enclave_nonce,
        devices=device_claims(devices),
    )
    return {
        "subject": subject,
        "not_after": not_after,
        "receipt_signing_keys": [],
        "e2ee_public_keys": [],
        "tls_public_keys": [] if tls_spki_sha256 is None else [{"spki_sha256": tls_spki_sha256}],
        "enclave_serve": workload.to_json(),
    }


def aci_report(
    *,
    keyset: Mapping[str, Any],
    report_data: bytes,
    primary: Evidence,
    devices: Sequence[Evidence],
    collateral: Mapping[str, Any],
    insecure_modes: Sequence[str],
    source_provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """Return the ``GET /v1/aci/attestation`` response body for evidence already collected.

    ``report_data`` is the 32-byte statement digest (:func:`aci_report_data`); ``primary`` was
    collected over it zero-padded to 64 bytes. ``devices`` is the evidence whose digests the
    keyset lists; ``insecure_modes`` the keyset's (repeated, unbound, for ACI readers).
    """
    digest = keyset_digest(keyset)
    return {
        "api_version": ACI_VERSION,
        "workload_keyset_digest": digest,
        "attestation": {
            "tee_type": ACI_TEE_TYPES.get(primary.tee, primary.tee.value),
            "workload_keyset": dict(keyset),
            "report_data": report_data.hex(),
            "source_provenance": dict(source_provenance),
            "evidence": {
                "primary": {"tee": primary.tee.value, "evidence": primary.to_json()},
                "devices": [{"tee": d.tee.value, "evidence": d.to_json()} for d in devices],
                "collateral": dict(collateral),
                "insecure_modes": list(insecure_modes),
            },
        },
        "service_capabilities": {"supported_e2ee_versions": [], "serving": "direct"},
    }
