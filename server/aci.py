"""The draft vendor-neutral Attested Confidential Inference report (``aci/1``), served beside ours.

ACI (dstack's draft spec, ``Dstack-TEE/private-ai-gateway spec/aci.md``) lets aggregators list
a confidential inference server without custom code. Its report binds a *workload keyset* to the
TEE evidence through one statement::

    keyset_digest = "sha256:" + hex(sha256(JCS(keyset)))
    statement     = {"keyset_digest":"sha256:<hex>","nonce":"<64 hex>"|null,"purpose":"aci.report_data.v1"}
    report_data   = sha256(statement) zero-padded to 64 bytes

What this module adds to the spec, inside the keyset (so bound by its digest): an
``enclave_serve`` member with the model identity (the manifest digest), the SHA-256 of the run
configuration, the init-data digest and the canary outcome — the model identity and
configuration ACI lacks. What it leaves out: receipts (``/v1/aci/receipts``), E2EE keys and
sessions (a direct service has none); the keyset lists no receipt-signing key, so a strict ACI
client that requires receipts will not accept this server yet. GPU evidence is collected with
the 32-byte ``report_data`` digest as its nonce.

Pure functions: nothing here collects evidence or opens a connection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from attest.binding import canonical_json
from attest.evidence import Evidence, TeeKind

__all__ = [
    "ACI_PURPOSE",
    "ACI_VERSION",
    "aci_report",
    "aci_report_data",
    "aci_statement",
    "keyset_digest",
    "workload_keyset",
]

ACI_VERSION = "aci/1"
ACI_PURPOSE = "aci.report_data.v1"
#: ACI ``tee_type`` by our TEE kind; the sample TEE needs a verifier extension (and proves nothing).
_TEE_TYPES = {TeeKind.TDX: "tdx", TeeKind.SNP: "sev_snp", TeeKind.SAMPLE: "enclave-serve-sample-insecure"}


def workload_keyset(
    *,
    not_after: int,
    tls_spki_sha256: str | None,
    model_digest: str,
    config_sha256: str,
    init_data: str | None,
    canary: Mapping[str, Any] | None,
    subject: str | None = None,
) -> dict[str, Any]:
    """Return the workload keyset: the TLS key, plus the ``enclave_serve`` workload member."""
    return {
        "subject": subject,
        "not_after": not_after,
        "receipt_signing_keys": [],
        "e2ee_public_keys": [],
        "tls_public_keys": [] if tls_spki_sha256 is None else [{"spki_sha256": tls_spki_sha256}],
        "enclave_serve": {
            "model": model_digest,
            "config_sha256": "sha256:" + config_sha256,
            "init_data": init_data,
            "canary": None if canary is None else canary.get("status"),
        },
    }


def keyset_digest(keyset: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of the keyset's JCS form."""
    return "sha256:" + hashlib.sha256(canonical_json(dict(keyset))).hexdigest()


def aci_statement(digest: str, nonce: bytes | None) -> bytes:
    """The exact statement bytes for ``digest`` and a 32-byte ``nonce`` (None: unchallenged)."""
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise ValueError("keyset digest must be sha256:<64 hex>")
    nonce_json = "null" if nonce is None else f'"{nonce.hex()}"'
    return f'{{"keyset_digest":"{digest}","nonce":{nonce_json},"purpose":"{ACI_PURPOSE}"}}'.encode()


def aci_report_data(digest: str, nonce: bytes | None) -> bytes:
    """The 32-byte ``report_data``: SHA-256 of the statement (the TEE field holds it zero-padded)."""
    return hashlib.sha256(aci_statement(digest, nonce)).digest()


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
    collected over it zero-padded to 64 bytes.
    """
    digest = keyset_digest(keyset)
    return {
        "api_version": ACI_VERSION,
        "workload_keyset_digest": digest,
        "attestation": {
            "tee_type": _TEE_TYPES.get(primary.tee, primary.tee.value),
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
