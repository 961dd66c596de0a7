"""AMD SEV-SNP: attestation reports (parser, verifier with a VCEK/VLEK as collateral, claims),
the configfs-tsm attester and the launch-measurement calculator.

Modules: :mod:`~attest.tee.snp.report` (pure parser), :mod:`~attest.tee.snp.verifier` and
:mod:`~attest.tee.snp.claims` (pure verification), :mod:`~attest.tee.snp.policy` (the ``[snp]``
section of the workload policy), :mod:`~attest.tee.snp.attester` (I/O: configfs-tsm) and
:mod:`~attest.tee.snp.measure` (reference values). :data:`BACKEND` is what the
registry (:mod:`attest.tee`) lists; nothing outside :mod:`attest.tee` imports this folder directly.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from attest.evidence import Evidence, TeeKind, b64decode_strict
from attest.tee.attester import Attester
from attest.tee.base import Collateral, InitDataRegister, TeeBackend
from attest.tee.snp.claims import SnpClaims
from attest.tee.snp.policy import SECTION
from attest.tee.snp.report import REPORT_SIZE, SnpEvidence, parse_snp_report
from attest.tee.snp.verifier import SnpCollateral, SnpVerifier
from foundation.errors import MalformedEvidence

__all__ = ["BACKEND"]


def _attester() -> type[Attester]:
    from attest.tee.snp.attester import SnpAttester

    return SnpAttester


def _read_register(attester: Attester, nonce: bytes, **options: Any) -> bytes:
    from attest.tee.snp.attester import snp_init_data_register

    return snp_init_data_register(attester, nonce)


def _fields(ev: Evidence) -> dict[str, Any]:
    assert isinstance(ev, SnpEvidence)
    out = parse_snp_report(ev.report).to_json()
    chain = [c.cert_type.value for c in ev.cert_chain or ()]
    return {"type": "snp_report", **out, "cert_chain": chain}


def _from_raw(raw: bytes, chain: bytes | None) -> tuple[Evidence, bool] | None:
    if len(raw) == REPORT_SIZE and 2 <= int.from_bytes(raw[:4], "little") <= 5:
        parse_snp_report(raw)
        return SnpEvidence(report=raw), False
    return None


def _with_chain(ev: Evidence, chain: bytes) -> tuple[Evidence, object | None]:
    return ev, SnpCollateral(vek=chain)


def _collateral_file(data: bytes) -> object:
    return {"vcek": base64.b64encode(data).decode()}


def _collateral_from_json(item: object) -> object:
    if not isinstance(item, Mapping):
        raise MalformedEvidence("collateral: snp must be an object with a 'vcek'")
    return SnpCollateral(vek=b64decode_strict(item.get("vcek"), "collateral snp.vcek"))


def _of_claims(claims: object) -> bytes | None:
    return claims.host_data if isinstance(claims, SnpClaims) else None


def _debuggable(claims: object) -> str | None:
    if isinstance(claims, SnpClaims) and claims.debug_allowed:
        return "the SNP guest policy allows debugging"
    return None


BACKEND = TeeBackend(
    kind=TeeKind.SNP,
    title="AMD SEV-SNP",
    detectable=True,
    evidence_type=SnpEvidence,
    evidence_from_json=SnpEvidence.from_json,
    json_key="attestation_report",
    verifier=SnpVerifier(),
    claims_type=SnpClaims,
    fields=_fields,
    from_raw=_from_raw,
    with_chain=_with_chain,
    collateral=Collateral(
        what="the VCEK or VLEK certificate (DER or PEM)",
        file_to_json=_collateral_file,
        from_json=_collateral_from_json,
    ),
    attester=_attester,
    init_data=InitDataRegister(name="HOST_DATA", size=32, of_claims=_of_claims, read=_read_register),
    aci_tee_type="sev_snp",
    debuggable=_debuggable,
    policy=SECTION,
    kata_runtime_class="kata-qemu-nvidia-gpu-snp",
)
