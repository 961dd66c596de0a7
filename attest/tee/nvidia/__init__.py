"""NVIDIA GPUs in confidential-computing mode: SPDM attestation reports (parser, verifier, claims)
and the NVML attester with its local gate.

Modules: :mod:`~attest.tee.nvidia.report` (pure parser), :mod:`~attest.tee.nvidia.verifier` and
:mod:`~attest.tee.nvidia.claims` (pure verification), :mod:`~attest.tee.nvidia.policy` (the
``[gpu]`` section of the workload policy), :mod:`~attest.tee.nvidia.attester` (I/O: NVML, no
verifier), :mod:`~attest.tee.nvidia.gate` (I/O: the local gate, verifying with the verifier) and
:mod:`~attest.tee.nvidia.pci` (I/O: the PCI bus in sysfs). :data:`BACKEND` is what the
registry (:mod:`attest.tee`) lists; nothing outside :mod:`attest.tee` imports this folder directly.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from attest.evidence import Evidence, TeeKind
from attest.tee.attester import DeviceAttester, DeviceGate
from attest.tee.base import TeeBackend
from attest.tee.nvidia.claims import NvidiaClaims
from attest.tee.nvidia.policy import SECTION
from attest.tee.nvidia.report import NvidiaDeviceEvidence, NvidiaEvidence, parse_nvidia_report
from attest.tee.nvidia.verifier import NvidiaVerifier

__all__ = ["BACKEND"]


def _attester() -> type[DeviceAttester]:
    from attest.tee.nvidia.attester import NvidiaAttester

    return NvidiaAttester


def _gate(attester: DeviceAttester, **options: Any) -> DeviceGate:
    from attest.tee.nvidia.gate import gate

    return gate(attester, **options)


def _fields(ev: Evidence) -> dict[str, Any]:
    assert isinstance(ev, NvidiaEvidence)
    gpus = [{"arch": d.arch, "uuid": d.uuid, **parse_nvidia_report(d.evidence).to_json()} for d in ev.devices]
    if len(gpus) == 1:
        return {"type": "nvidia_report", **gpus[0]}
    return {"type": "nvidia_evidence", "gpus": gpus}


def _arch_from_chain(chain: bytes | None) -> str:
    """The GPU architecture the leaf certificate names (``GH100 …`` Hopper, ``GB…`` Blackwell)."""
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0] if chain else None
    except (ValueError, IndexError):
        leaf = None
    names = [] if leaf is None else leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return "BLACKWELL" if names and str(names[0].value).startswith("GB") else "HOPPER"


def _from_raw(raw: bytes, chain: bytes | None) -> tuple[Evidence, bool] | None:
    if len(raw) >= 2 and raw[:2] == b"\x11\xe0":
        parse_nvidia_report(raw)
        arch = _arch_from_chain(chain)
        device = NvidiaDeviceEvidence(arch=arch, uuid="unknown", evidence=raw, certificate=chain or b"")
        return NvidiaEvidence(devices=(device,)), False
    return None


def _with_chain(ev: Evidence, chain: bytes) -> tuple[Evidence, object | None]:
    assert isinstance(ev, NvidiaEvidence)
    devices = tuple(
        NvidiaDeviceEvidence(arch=d.arch, uuid=d.uuid, evidence=d.evidence, certificate=chain)
        for d in ev.devices
    )
    return NvidiaEvidence(devices=devices), None


BACKEND = TeeBackend(
    kind=TeeKind.NVIDIA,
    title="NVIDIA GPU confidential computing",
    device=True,
    detectable=True,
    evidence_type=NvidiaEvidence,
    evidence_from_json=NvidiaEvidence.from_json,
    json_key="device_evidence_list",
    verifier=NvidiaVerifier(),
    claims_type=NvidiaClaims,
    fields=_fields,
    from_raw=_from_raw,
    with_chain=_with_chain,
    attester=_attester,
    policy=SECTION,
    gate=_gate,
)
