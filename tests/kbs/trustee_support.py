"""Trustee, simulated with its own rego engine: EAR token inputs built from verified evidence.

What Trustee's built-in attestation service does with verified evidence, at trustee ``78962cd4``
(docs/kbs.md, "What Trustee's resource policy sees"):

1. each verifier turns evidence into claims: TDX ``deps/verifier/src/tdx/claims.rs``
   ``generate_parsed_claim`` plus the DCAP claims (``deps/verifier/src/intel_dcap/claims.rs``,
   merged at the top), SNP ``deps/verifier/src/snp/mod.rs`` ``parse_tee_evidence``, NVIDIA (local
   verifier) ``deps/verifier/src/nvidia/mod.rs`` ``NvDeviceReportAndCertClaim``, one per GPU;
2. ``attestation-service/src/ear_token/broker.rs`` ``transform_claims`` moves ``init_data`` and
   ``report_data`` to the top, adds ``init_data_claims`` (``attestation-service/src/lib.rs``
   ``parse_init_data``: the init-data's ``data`` table) and ``runtime_data_claims``, and puts the
   rest under the TEE's name;
3. ``issue`` evaluates the attestation policy ``default_<class>`` (regorus) on that object, sets
   the trust vector from ``trust_claims`` and ``ear.status`` from it, and names the submodule
   ``<class><index>`` (``cpu0``, ``gpu0``, ``gpu1``, ...);
4. the KBS evaluates ``data.policy.allow`` of the resource policy with the token claims as input
   and ``{"plugin", "resource-path", "query"}`` as data (``kbs/src/api_server.rs``).

Here the claims come from :mod:`attest.verify` results of the real vectors, so both kbs-dev and
this simulation see the same facts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import regorus

from attest.initdata import InitData
from attest.tee.nvidia.claims import GpuClaims, NvidiaClaims
from attest.tee.snp.claims import SnpClaims
from attest.tee.tdx.claims import TCB_STATUS_UNKNOWN, TdxClaims
from attest.verify import VerificationResult
from attest.verify.trustee import TrusteeExport
from attest.verify.workload import SNP_POLICY_DEBUG, SNP_POLICY_MIGRATE_MA, SNP_POLICY_SMT

# TDX ATTRIBUTES flags Trustee names (deps/verifier/src/tdx/claims.rs TdAttributesFlags).
_TD_FLAGS = {"debug": 0, "septve_disable": 28, "protection_keys": 30, "key_locker": 31, "perfmon": 63}


def tdx_claims(c: TdxClaims) -> dict[str, Any]:
    """The TDX verifier's claims (before ``transform_claims``)."""
    attributes = int.from_bytes(c.td_attributes, "little")
    body = {"mr_td": c.mrtd.hex(), "td_attributes": c.td_attributes.hex(), "xfam": c.xfam.hex(),
            "mr_seam": c.mr_seam.hex(), "mr_config_id": c.mr_config_id.hex(), "report_data": c.report_data.hex(),
            **{f"rtmr_{i}": r.hex() for i, r in enumerate(c.rtmrs)}}  # fmt: skip
    out: dict[str, Any] = {
        "quote": {"header": {"tee_type": "81000000"}, "body": body},
        "td_attributes": {name: bool(attributes >> bit & 1) for name, bit in _TD_FLAGS.items()},
        "report_data": c.report_data.hex(),
        "init_data": c.mr_config_id.hex(),
    }
    if c.tcb_status != TCB_STATUS_UNKNOWN:  # Trustee's QVL always has collateral
        out |= {"tcb_status": c.tcb_status, "collateral_expiration_status": "0",
                "advisory_ids": list(c.advisory_ids)}  # fmt: skip
        if c.ppid is not None:
            out["platform_provider_id"] = c.ppid.hex()
    return out


def snp_claims(c: SnpClaims) -> dict[str, Any]:
    """The SNP verifier's claims (``parse_tee_evidence``)."""
    t = c.reported_tcb
    return {
        "policy_smt_allowed": bool(c.policy & SNP_POLICY_SMT),
        "policy_migrate_ma": bool(c.policy & SNP_POLICY_MIGRATE_MA),
        "policy_debug_allowed": bool(c.policy & SNP_POLICY_DEBUG),
        "reported_tcb_bootloader": t.bootloader,
        "reported_tcb_tee": t.tee,
        "reported_tcb_snp": t.snp,
        "reported_tcb_microcode": t.microcode,
        "measurement": c.measurement.hex(),
        "report_data": c.report_data.hex(),
        "init_data": c.host_data.hex(),
        "chip_id": c.chip_id.hex(),
    }


def gpu_claims(g: GpuClaims) -> dict[str, Any]:
    """The local NVIDIA verifier's claims for one GPU (arch as its serde name, e.g. ``Hopper``)."""
    config = {"driver_version": g.driver_version, "vbios_version": g.vbios_version, "project": g.project}
    return {"arch": g.arch.capitalize(), "uuid": g.uuid, "measurements": {str(i): m.hex() for i, m in g.measurements},
            "config": config}  # fmt: skip


def _transform(tee: str, claims: dict[str, Any], init: InitData | None) -> dict[str, Any]:
    claims = dict(claims)
    out: dict[str, Any] = {}
    if "init_data" in claims:
        out["init_data"] = claims.pop("init_data")
        out["init_data_claims"] = None if init is None else dict(init.data)
    if "report_data" in claims:
        out["report_data"] = claims.pop("report_data")
        out["runtime_data_claims"] = {"nonce": "", "tee-pubkey": {}}
    out[tee] = claims
    return out


def ear_status(trust_claims: Mapping[str, int]) -> str:
    """The worst AR4SI tier of the trust vector (draft-ietf-rats-ar4si; the ``ear`` crate)."""
    rank = {"none": 0, "affirming": 1, "warning": 2, "contraindicated": 3}
    worst = "none"
    for value in trust_claims.values():
        tier = ("none" if -1 <= value <= 1 else "affirming" if value <= 31
                else "warning" if value <= 95 else "contraindicated")  # fmt: skip
        worst = max(worst, tier, key=rank.__getitem__)
    return worst


def appraise(policy_text: str | None, annotated: dict[str, Any]) -> dict[str, Any]:
    """One EAR submodule: the attestation policy's trust vector and status (none: warning)."""
    if policy_text is None:
        return {"ear.status": "warning", "ear.veraison.annotated-evidence": annotated}
    engine = regorus.Engine()
    engine.add_policy("attestation.rego", policy_text)
    engine.set_input_json(json.dumps(annotated))
    trust = engine.eval_rule("data.policy.trust_claims")
    return {"ear.status": ear_status(trust), "ear.trustworthiness-vector": trust,
            "ear.veraison.annotated-evidence": annotated}  # fmt: skip


def token(
    primary: VerificationResult,
    devices: Sequence[VerificationResult],
    init: InitData | None,
    attestation_policies: Mapping[str, str],
) -> dict[str, Any]:
    """The EAR token claims Trustee would issue for these verified results."""
    claims = primary.claims
    if isinstance(claims, TdxClaims):
        cpu = _transform("tdx", tdx_claims(claims), init)
    elif isinstance(claims, SnpClaims):
        cpu = _transform("snp", snp_claims(claims), init)
    else:
        raise TypeError(f"no Trustee claims for {primary.tee.value}")
    submods = {"cpu0": appraise(attestation_policies.get("default_cpu"), cpu)}
    gpus = [g for d in devices if isinstance(d.claims, NvidiaClaims) for g in d.claims.gpus]
    for index, gpu in enumerate(gpus):
        submods[f"gpu{index}"] = appraise(
            attestation_policies.get("default_gpu"), {"nvidia": gpu_claims(gpu)}
        )
    return {"eat_profile": "tag:github.com,2024:confidential-containers/Trustee", "submods": submods}


def allows(resource_policy: str, claims: Mapping[str, Any], path: str) -> bool:
    """``data.policy.allow`` of ``resource_policy`` as Trustee's KBS evaluates it."""
    engine = regorus.Engine()
    engine.add_policy("resource-policy.rego", resource_policy)
    engine.add_data_json(json.dumps({"plugin": "resource", "resource-path": path.split("/"), "query": {}}))
    engine.set_input_json(json.dumps(claims))
    return engine.eval_rule("data.policy.allow") is True


def trustee_releases(
    export: TrusteeExport,
    primary: VerificationResult,
    devices: Sequence[VerificationResult],
    init: InitData | None,
    path: str,
) -> bool:
    """Whether a Trustee with ``export`` installed releases ``path`` to this enclave."""
    return allows(export.resource_policy, token(primary, devices, init, export.attestation_policies), path)
