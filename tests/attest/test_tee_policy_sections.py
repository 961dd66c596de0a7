"""Each TEE's workload-policy section lives in its folder and is reached through the registry.

What these prove about the structure (issue 23): every section round-trips record -> TOML ->
parse -> evaluate on its own claims; the policy's tables and the insecure set are the registry's
(the Kata runtime classes: ``tests/runtime/test_deploy.py``); and a section added to a test-only copy of the registry is parsed,
applied, explained and written without touching ``attest/verify/workload.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import pytest

from attest.evidence import TeeKind
from attest.tee import (
    BACKENDS,
    GpuClaims,
    GpuRules,
    NvidiaClaims,
    SampleClaims,
    insecure_kinds,
    insecure_names,
)
from attest.tee.base import PolicySection
from attest.tee.policyparts import PolicyFileError, RuleCheck, TrusteeRules, check_int, known
from attest.tee.result import VerificationResult
from attest.verify import SnpCollateral, TdxCollateral, verify_evidence, workload
from attest.verify.workload import RuleOutcome, WorkloadFacts, WorkloadPolicy, WorkloadRules
from foundation.errors import PolicyViolation
from tests.attest.support import NOW
from tests.vector_files import vector

MODEL = "sha256:" + "ab" * 32
CONFIG = "sha256:" + "cd" * 32
INIT = ("sha384", hashlib.sha384(b"an init-data document").digest())


def _tdx() -> VerificationResult:
    from attest.tee.tdx.quote import TdxEvidence

    collateral = TdxCollateral.from_json(vector("tdx/tdx_quote_collateral.json"))
    return verify_evidence(
        TdxEvidence(quote=vector("tdx/tdx_quote")), expected_report_data=None, now=NOW, collateral=collateral
    )


def _snp() -> VerificationResult:
    from attest.tee.snp.report import SnpEvidence

    return verify_evidence(
        SnpEvidence(report=vector("snp/test-report.bin")),
        expected_report_data=None,
        now=NOW,
        collateral=SnpCollateral(vek=vector("snp/test-vcek.der")),
    )


def _gpus() -> tuple[VerificationResult, ...]:
    gpu = GpuClaims(
        uuid="GPU-0", arch="HOPPER", nonce=bytes(32), driver_version="550.90.07", vbios_version="96.00.9F.00.01",
        project=None, project_sku=None, chip_sku=None, fwid=None, feature_flag=None, measurements=(),
        leaf_subject="CN=GH100 A01 FSP BROM",
    )  # fmt: skip
    claims = NvidiaClaims(gpus=(gpu,))
    return (VerificationResult(tee=TeeKind.NVIDIA, insecure=False, steps=(), claims=claims),)


def _sample_devices() -> tuple[VerificationResult, ...]:
    claims = SampleClaims(svn=1, report_data=b"")
    return (VerificationResult(tee=TeeKind.SAMPLE_DEVICE, insecure=True, steps=(), claims=claims),)


#: Verified results each section is recorded from (primary sections: the TEE's; device: devices).
RESULTS = {"tdx": _tdx, "snp": _snp, "gpu": _gpus}
#: Rules a recorded policy may fail on its own vector: the TDX vector's TCB is not UpToDate.
VECTOR_TCB = {"tdx.tcb_status", "tdx.collateral"}


def _sections() -> list[tuple[Any, PolicySection]]:
    return [(b, b.policy) for b in BACKENDS.values() if b.policy is not None]


def test_every_section_lives_in_its_backends_folder_and_the_sections_are_the_registrys() -> None:
    sections = _sections()
    assert [s.table for _b, s in sections] == ["tdx", "snp", "gpu"]
    for b, section in sections:
        assert type(section).__module__ == f"attest.tee.{b.kind.value}.policy"
        if not b.device:
            assert section.table == b.name  # "[tee] allows tdx" needs "[tdx]"
    assert set(RESULTS) == {s.table for _b, s in sections}, "a section without a round-trip test"


@pytest.mark.parametrize("table", sorted(RESULTS))
def test_each_section_round_trips_record_toml_parse_evaluate(table: str) -> None:
    backend, section = next((b, s) for b, s in _sections() if s.table == table)
    results = RESULTS[table]()
    results = results if isinstance(results, tuple) else (results,)
    notes: list[str] = []
    rules = section.record(results, notes)
    assert isinstance(rules, section.rules_type)
    lines = section.to_toml(rules)
    assert lines[0] == f"[{table}]"
    parsed = section.parse(tomllib.loads("\n".join(lines))[table])
    assert parsed == rules
    assert section.explain(parsed)
    outcomes: list[RuleOutcome] = []

    def rule(name: str, check: Any) -> None:
        try:
            outcomes.append(RuleOutcome(rule=name, ok=True, detail=check()))
        except PolicyViolation as exc:
            outcomes.append(RuleOutcome(rule=name, ok=False, detail=str(exc)))

    section.evaluate(rule, parsed, results, allow_insecure=False)
    assert outcomes, f"[{table}] applied no rule"
    assert all(o.rule == table or o.rule.startswith(f"{table}.") for o in outcomes)
    failed = {o.rule for o in outcomes if not o.ok}
    assert failed <= VECTOR_TCB, failed
    trustee = section.trustee(parsed)
    assert trustee.placements and all(p.rule.startswith(table) for p in trustee.placements)
    assert backend.policy is section


def test_a_recorded_policy_with_every_section_reads_back_as_itself() -> None:
    tdx = _tdx()
    sections: dict[str, object] = {}
    for b, section in _sections():
        results = _gpus() if b.device else (tdx,)
        rules = section.record(results, [])
        if rules is not None:
            sections[section.table] = rules
    assert set(sections) == {"tdx", "gpu"}  # SNP records nothing from TDX claims
    policy = WorkloadPolicy(
        tees=("tdx",),
        workload=WorkloadRules(model=(MODEL,), config=(CONFIG,), init_data=(INIT,)),
        sections=sections,
    )
    assert policy.tdx is sections["tdx"] and policy.gpu is sections["gpu"] and policy.sections == {}
    assert WorkloadPolicy.from_toml(policy.to_toml()) == policy
    assert dataclasses.replace(policy, gpu=None).rules("gpu") is None


def test_the_sample_devices_count_as_gpus_only_when_insecure_is_allowed() -> None:
    section = BACKENDS[TeeKind.NVIDIA].policy
    assert section is not None
    rules = GpuRules(count=1, driver=("550.90.07",), vbios=("96.00.9f.00.01",))
    outcomes: list[tuple[str, bool]] = []

    def rule(name: str, check: Any) -> None:
        try:
            check()
            outcomes.append((name, True))
        except PolicyViolation:
            outcomes.append((name, False))

    section.evaluate(rule, rules, _sample_devices(), allow_insecure=True)
    section.evaluate(rule, rules, _sample_devices(), allow_insecure=False)
    assert outcomes == [("gpu", True), ("gpu", False)]


def test_a_policy_recorded_from_sample_devices_is_valid_and_refuses_real_gpus() -> None:
    """``policy record`` from sample devices: they claim no driver or VBIOS, so the section pins
    the sample marker (``driver``/``vbios`` are required when count > 0); the policy parses back,
    passes the sample devices under the insecure flag, and refuses a real GPU."""
    from attest.tee.nvidia.policy import SAMPLE_DEVICE_VERSION

    section = BACKENDS[TeeKind.NVIDIA].policy
    assert section is not None
    notes: list[str] = []
    rules = section.record(_sample_devices(), notes)
    assert rules == GpuRules(count=1, driver=(SAMPLE_DEVICE_VERSION,), vbios=(SAMPLE_DEVICE_VERSION,))
    assert any("sample devices" in note for note in notes)
    text = "\n".join(section.to_toml(rules))
    assert section.parse(tomllib.loads(text)["gpu"]) == rules

    def rule(name: str, check: Any) -> None:
        check()

    section.evaluate(rule, rules, _sample_devices(), allow_insecure=True)
    with pytest.raises(PolicyViolation, match=r"runs driver 550\.90\.07, not one of sample"):
        section.evaluate(rule, rules, _gpus(), allow_insecure=True)


def test_the_insecure_set_is_the_backends_marked_insecure() -> None:
    marked = {k for k, b in BACKENDS.items() if b.insecure}
    assert insecure_kinds() == marked and insecure_names() == {k.value for k in marked}
    assert marked == {TeeKind.SAMPLE, TeeKind.SAMPLE_DEVICE}
    # The workload policy and the Trustee export read the same set.
    with pytest.raises(PolicyFileError, match="insecure_development = true"):
        WorkloadPolicy(tees=("sample",), workload=WorkloadRules(model=(MODEL,), config=(CONFIG,)))


# -- a section added to a test-only copy of the registry ---------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ExtraRules:
    """``[extra]``: how many extra devices (a section no shipped TEE has)."""

    count: int

    def __post_init__(self) -> None:
        check_int(self.count, "extra", "count")


class ExtraSection:
    """A device section only this test registers."""

    table = "extra"
    rules_type = ExtraRules

    def parse(self, table: Mapping[str, Any]) -> ExtraRules:
        known(table, "extra", ("count",))
        return ExtraRules(count=table.get("count"))  # type: ignore[arg-type]

    def evaluate(
        self,
        rule: RuleCheck,
        rules: object | None,
        results: Sequence[VerificationResult],
        *,
        allow_insecure: bool,
    ) -> None:
        def check() -> str:
            expected = rules.count if isinstance(rules, ExtraRules) else 0
            if len(results) != expected:
                raise PolicyViolation(f"{len(results)} extra device(s), expected {expected}")
            return f"{expected} extra device(s)"

        rule("extra", check)

    def explain(self, rules: object | None) -> list[str]:
        return [f"extra devices: {rules.count if isinstance(rules, ExtraRules) else 0}"]

    def to_toml(self, rules: object) -> list[str]:
        assert isinstance(rules, ExtraRules)
        return ["[extra]", f"count = {rules.count}"]

    def record(self, results: Sequence[VerificationResult], notes: list[str]) -> ExtraRules | None:
        return ExtraRules(count=len(results)) if results else None

    def trustee(self, rules: object) -> TrusteeRules:
        return TrusteeRules(claims_key="extra", prefix="extra")


def test_a_section_in_a_copy_of_the_registry_is_parsed_applied_and_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The workload policy names no TEE: register a section in a copy of the registry (on the
    sample device's descriptor) and the parser, the rules, ``explain`` and ``to_toml`` follow."""
    extra: PolicySection = ExtraSection()
    registry = dict(BACKENDS)
    registry[TeeKind.SAMPLE_DEVICE] = dataclasses.replace(BACKENDS[TeeKind.SAMPLE_DEVICE], policy=extra)
    monkeypatch.setattr(workload, "BACKENDS", MappingProxyType(registry))
    tdx = _tdx()
    text = WorkloadPolicy(
        tees=("tdx",),
        workload=WorkloadRules(model=(MODEL,), config=(CONFIG,), init_data=(INIT,)),
        tdx=BACKENDS[TeeKind.TDX].policy.record((tdx,), []),  # type: ignore[union-attr]
    ).to_toml()
    policy = WorkloadPolicy.from_toml(text + "\n[extra]\ncount = 1\n")
    assert policy.rules("extra") == ExtraRules(count=1)
    assert "extra devices: 1" in policy.explain()
    assert WorkloadPolicy.from_toml(policy.to_toml()) == policy
    facts = WorkloadFacts(
        primary=tdx, devices=_sample_devices(), model_digest=MODEL, config_sha256=CONFIG,
        init_data_register=workload.init_data_register_of(tdx), allow_insecure=True,
    )  # fmt: skip
    outcomes = {o.rule: o.ok for o in policy.evaluate(facts)}
    assert outcomes["extra"] is True
    with pytest.raises(PolicyFileError, match=r"\[extra\] has unknown key\(s\) typo"):
        WorkloadPolicy.from_toml(text + "\n[extra]\ntypo = 1\n")
    monkeypatch.undo()
    with pytest.raises(PolicyFileError, match=r"unknown key\(s\) extra"):
        WorkloadPolicy.from_toml(text + "\n[extra]\ncount = 1\n")
