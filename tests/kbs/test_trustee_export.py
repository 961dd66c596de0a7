"""The Trustee export enforces every workload-policy rule, checked with Trustee's engine (regorus).

The facts are the real TDX (DCAP quote + collateral), SNP (Milan report + VCEK) and NVIDIA
(Hopper report + chain) vectors, verified by :mod:`attest.verify`; the init-data register is set
to the allowed init-data's (the vectors' TDs were launched without one). One table of cases
runs through kbs-dev's resource-policy check and through regorus on the export, and requires
the same verdict.
"""

from __future__ import annotations

import binascii
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData
from attest.kbs.dev.appraisal import Appraisal
from attest.kbs.dev.policy import PolicyDenied
from attest.kbs.dev.server import DevKbsConfig, _Kbs
from attest.tee.nvidia.claims import NvidiaClaims
from attest.tee.nvidia.report import NvidiaDeviceEvidence, NvidiaEvidence
from attest.tee.snp.claims import SnpClaims
from attest.tee.snp.report import SnpEvidence
from attest.tee.tdx.claims import TCB_STATUS_UNKNOWN, TdxClaims
from attest.tee.tdx.quote import TdxEvidence
from attest.verify import (
    SnpCollateral,
    TdxCollateral,
    VerificationResult,
    verify_device_evidence,
    verify_evidence,
)
from attest.verify.trustee import ExportRefused, check_init_data, export_policy, kbs_client_script
from attest.verify.workload import (
    SNP_POLICY_DEBUG,
    SNP_POLICY_MIGRATE_MA,
    TDX_ATTR_DEBUG,
    TDX_ATTR_MIGRATABLE,
    TDX_ATTR_SEPT_VE_DISABLE,
    GpuRules,
    SnpRules,
    TdxRules,
    WorkloadPolicy,
    WorkloadRules,
)
from foundation.errors import MalformedEvidence
from foundation.secret import SecretBytes
from tests.attest.support import HOPPER_NONCE, NOW, workload_pins
from tests.kbs.support import ADMIN_TOKEN
from tests.kbs.trustee_support import allows, token, trustee_releases
from tests.vector_files import vector

PATH = "models/llama/key"
MODEL = "sha256:" + "ab" * 32
OTHER = bytes.fromhex("5a" * 47 + "01")


def init_data(model: str = MODEL, version: str = "0.1.0") -> InitData:
    from tests.attest.support import TEST_RUNTIME_FACTS

    pins = workload_pins(
        model, key_resource=f"kbs:///{PATH}", runtime={**TEST_RUNTIME_FACTS, "version": version}
    )
    return InitData.build(
        entries=[("policy.rego", "package agent_policy\n"), (ENCLAVE_SERVE_ENTRY, pins.to_toml())]
    )


INIT = init_data()
CONFIG = "sha256:" + workload_pins(MODEL, key_resource=f"kbs:///{PATH}").config_sha256


# -- the verified vectors -------------------------------------------------------------------


def _tdx() -> VerificationResult:
    collateral = TdxCollateral.from_json(vector("tdx/tdx_quote_collateral.json"))
    return verify_evidence(TdxEvidence(quote=vector("tdx/tdx_quote")), expected_report_data=None, now=NOW,
                           collateral=collateral)  # fmt: skip


def _snp() -> VerificationResult:
    return verify_evidence(SnpEvidence(report=vector("snp/test-report.bin")), expected_report_data=None, now=NOW,
                           collateral=SnpCollateral(vek=vector("snp/test-vcek.der")))  # fmt: skip


def _gpus(count: int) -> VerificationResult:
    report = binascii.unhexlify(vector("nvidia/hopperAttestationReport.txt").strip())
    device = NvidiaDeviceEvidence(arch="HOPPER", uuid="GPU-0", evidence=report,
                                  certificate=vector("nvidia/hopperCertChain.txt"))  # fmt: skip
    result = verify_device_evidence(
        NvidiaEvidence(devices=(device,)), expected_runtime_data=HOPPER_NONCE, now=NOW
    )
    assert isinstance(result.claims, NvidiaClaims)
    gpu = result.claims.gpus[0]
    gpus = tuple(dataclasses.replace(gpu, uuid=f"GPU-{i}") for i in range(count))
    return dataclasses.replace(result, claims=dataclasses.replace(result.claims, gpus=gpus))


TDX, SNP, HOPPERS = _tdx(), _snp(), _gpus(8)


def with_claims(result: VerificationResult, **changes: Any) -> VerificationResult:
    return dataclasses.replace(result, claims=dataclasses.replace(result.claims, **changes))  # type: ignore[type-var]


def launched(result: VerificationResult, init: InitData) -> VerificationResult:
    """The vector's evidence with the init-data register of ``init`` (MRCONFIGID, HOST_DATA)."""
    if result.tee is TeeKind.TDX:
        return with_claims(result, mr_config_id=init.register(TeeKind.TDX))
    return with_claims(result, host_data=init.register(TeeKind.SNP))


def tdx_policy(gpus: int = 8, **changes: Any) -> WorkloadPolicy:
    c = TDX.claims
    assert isinstance(c, TdxClaims) and c.ppid is not None
    rules = TdxRules(mrtd=(c.mrtd,), rtmr=tuple((r,) for r in c.rtmrs), ppid=(c.ppid,))
    return _policy("tdx", dataclasses.replace(rules, **changes), gpus)


def snp_policy(gpus: int = 1, **changes: Any) -> WorkloadPolicy:
    c = SNP.claims
    assert isinstance(c, SnpClaims)
    t = c.reported_tcb
    rules = SnpRules(measurement=(c.measurement,), chip_id=(c.chip_id,),
                     min_tcb={"bootloader": t.bootloader, "tee": t.tee, "snp": t.snp, "microcode": t.microcode})  # fmt: skip
    return _policy("snp", dataclasses.replace(rules, **changes), gpus)


def _policy(tee: str, rules: TdxRules | SnpRules, gpus: int, **workload: Any) -> WorkloadPolicy:
    w = WorkloadRules(model=(MODEL,), config=(CONFIG,), init_data=((INIT.algorithm, INIT.digest),),
                      runtime_version=("0.1.0",))  # fmt: skip
    gpu = GpuRules(count=gpus, arch=("HOPPER",), driver=("550.90.07",), vbios=("96.00.9f.00.01",))
    return WorkloadPolicy(tees=(tee,), workload=dataclasses.replace(w, **workload), gpu=gpu,
                          **{tee: rules})  # type: ignore[arg-type]  # fmt: skip


def with_workload(policy: WorkloadPolicy, **changes: Any) -> WorkloadPolicy:
    return dataclasses.replace(policy, workload=dataclasses.replace(policy.workload, **changes))


# -- the two engines --------------------------------------------------------------------------


def kbs_dev_releases(
    policy: WorkloadPolicy,
    primary: VerificationResult,
    devices: tuple[VerificationResult, ...],
    init: InitData,
) -> bool:
    """kbs-dev's resource-policy check (``--resource-policy PATH=policy``) on an appraisal."""
    kbs = _Kbs(DevKbsConfig(admin_token=SecretBytes(ADMIN_TOKEN), workload_policies={PATH: policy}))
    from attest.verify.workload import init_data_register_of

    appraisal = Appraisal(submods={}, primary=primary, devices=devices, init_data=init,
                          init_data_register=init_data_register_of(primary))  # fmt: skip
    try:
        kbs._check_workload(PATH, policy, appraisal)
    except PolicyDenied:
        return False
    return True


def export_releases(
    policy: WorkloadPolicy,
    primary: VerificationResult,
    devices: tuple[VerificationResult, ...],
    init: InitData,
) -> bool | str:
    """regorus on the export (the allowed init-data is INIT); ``"refused: rule"`` if not exported."""
    try:
        export = export_policy(policy, [INIT])
    except ExportRefused as exc:
        return f"refused: {exc.rule}"
    return trustee_releases(export, primary, devices, init, PATH)


@dataclass(frozen=True)
class Case:
    name: str
    policy: Callable[[], WorkloadPolicy]
    primary: Callable[[], VerificationResult]
    devices: Callable[[], tuple[VerificationResult, ...]] = lambda: (HOPPERS,)
    init: InitData = INIT
    allowed: bool = False
    refused: str | None = field(default=None)  # the rule the export refuses


def _tdx_attrs(set_bits: int = 0, clear_bits: int = 0) -> Callable[[], VerificationResult]:
    def make() -> VerificationResult:
        c = TDX.claims
        assert isinstance(c, TdxClaims)
        value = (int.from_bytes(c.td_attributes, "little") | set_bits) & ~clear_bits
        return with_claims(launched(TDX, INIT), td_attributes=value.to_bytes(8, "little"),
                           debug=bool(value & TDX_ATTR_DEBUG))  # fmt: skip

    return make


def _snp_policy_bits(bits: int) -> Callable[[], VerificationResult]:
    def make() -> VerificationResult:
        c = SNP.claims
        assert isinstance(c, SnpClaims)
        return with_claims(
            launched(SNP, INIT),
            policy=c.policy | bits,
            debug_allowed=bool((c.policy | bits) & SNP_POLICY_DEBUG),
        )

    return make


def _gpu(index: int, **changes: Any) -> Callable[[], tuple[VerificationResult, ...]]:
    def make() -> tuple[VerificationResult, ...]:
        c = HOPPERS.claims
        assert isinstance(c, NvidiaClaims)
        gpus = list(c.gpus)
        gpus[index] = dataclasses.replace(gpus[index], **changes)
        return (with_claims(HOPPERS, gpus=tuple(gpus)),)

    return make


TDX_OK = lambda: launched(TDX, INIT)  # noqa: E731
SNP_OK = lambda: launched(SNP, INIT)  # noqa: E731
ONE_GPU = lambda: (_gpus(1),)  # noqa: E731
CASES = [
    Case("tdx: the pinned workload, 8 GPUs", tdx_policy, TDX_OK, allowed=True),
    Case("tdx.mrtd: another firmware", lambda: tdx_policy(mrtd=(OTHER,)), TDX_OK),
    Case(
        "tdx.rtmr0: another firmware config",
        lambda: tdx_policy(rtmr=((OTHER,), *tdx_policy().tdx.rtmr[1:])),
        TDX_OK,
    ),  # type: ignore[union-attr]
    Case(
        "tdx.rtmr2: another kernel command line",
        lambda: tdx_policy(rtmr=(*tdx_policy().tdx.rtmr[:2], (OTHER,), None)),
        TDX_OK,
    ),  # type: ignore[union-attr]
    Case(
        "tdx.rtmr3: pinned, differs", lambda: tdx_policy(rtmr=(*tdx_policy().tdx.rtmr[:3], (OTHER,))), TDX_OK
    ),  # type: ignore[union-attr]
    Case("tdx.tcb_status: UpToDate not allowed", lambda: tdx_policy(tcb_status=("OutOfDate",)), TDX_OK),
    Case(
        "tdx.collateral: none behind the TCB status",
        tdx_policy,
        lambda: with_claims(launched(TDX, INIT), tcb_status=TCB_STATUS_UNKNOWN),
    ),
    Case("tdx.debug: a debuggable TD", tdx_policy, _tdx_attrs(set_bits=TDX_ATTR_DEBUG)),
    Case("tdx.migratable: a migratable TD", tdx_policy, _tdx_attrs(set_bits=TDX_ATTR_MIGRATABLE)),
    Case(
        "tdx.sept_ve_disable: #VE not disabled", tdx_policy, _tdx_attrs(clear_bits=TDX_ATTR_SEPT_VE_DISABLE)
    ),
    Case("tdx.ppid: another machine", lambda: tdx_policy(ppid=(OTHER[:16],)), TDX_OK),
    Case(
        "workload.init_data: another init-data",
        tdx_policy,
        lambda: launched(TDX, init_data("sha256:" + "cd" * 32)),
        init=init_data("sha256:" + "cd" * 32),
    ),
    Case(
        "workload.model: the init-data's model not allowed",
        lambda: with_workload(tdx_policy(), model=("sha256:" + "ef" * 32,)),
        TDX_OK,
        refused="workload.model",
    ),
    Case(
        "workload.config: the init-data's configuration not allowed",
        lambda: with_workload(tdx_policy(), config=("sha256:" + "ef" * 32,)),
        TDX_OK,
        refused="workload.config",
    ),
    Case(
        "workload.runtime_version: not allowed",
        lambda: with_workload(tdx_policy(), runtime_version=("0.2.0",)),
        TDX_OK,
        refused="workload.runtime_version",
    ),
    Case("gpu.count: 7 of 8 GPUs attested", tdx_policy, TDX_OK, devices=lambda: (_gpus(7),)),
    Case("gpu: a 9th GPU", tdx_policy, TDX_OK, devices=lambda: (_gpus(9),)),
    Case(
        "gpu.driver: gpu1 runs another driver",
        tdx_policy,
        TDX_OK,
        devices=_gpu(1, driver_version="535.104.05"),
    ),
    Case(
        "gpu.driver: gpu7 runs another driver",
        tdx_policy,
        TDX_OK,
        devices=_gpu(7, driver_version="535.104.05"),
    ),
    Case(
        "gpu.vbios: gpu3 has another VBIOS",
        tdx_policy,
        TDX_OK,
        devices=_gpu(3, vbios_version="96.00.74.00.01"),
    ),
    Case("gpu.arch: gpu5 is not a Hopper", tdx_policy, TDX_OK, devices=_gpu(5, arch="BLACKWELL")),
    Case("snp: the pinned workload, 1 GPU", snp_policy, SNP_OK, devices=ONE_GPU, allowed=True),
    Case(
        "snp: no GPUs, none expected",
        lambda: dataclasses.replace(snp_policy(), gpu=None),
        SNP_OK,
        devices=lambda: (),
        allowed=True,
    ),
    Case(
        "gpu: a GPU the policy does not expect",
        lambda: dataclasses.replace(snp_policy(), gpu=None),
        SNP_OK,
        devices=ONE_GPU,
    ),
    Case("snp.measurement: another guest", lambda: snp_policy(measurement=(OTHER,)), SNP_OK, devices=ONE_GPU),
    Case(
        "snp.min_tcb: snp SPL below the floor",
        lambda: snp_policy(min_tcb={**snp_policy().snp.min_tcb, "snp": 9}),
        SNP_OK,
        devices=ONE_GPU,
    ),  # type: ignore[union-attr]
    Case(
        "snp.debug: the guest policy allows debugging",
        snp_policy,
        _snp_policy_bits(SNP_POLICY_DEBUG),
        devices=ONE_GPU,
    ),
    Case(
        "snp.migration: a migration agent allowed",
        snp_policy,
        _snp_policy_bits(SNP_POLICY_MIGRATE_MA),
        devices=ONE_GPU,
    ),
    Case(
        "snp.smt: SMT not allowed (the vector allows it)",
        lambda: snp_policy(allow_smt=False),
        SNP_OK,
        devices=ONE_GPU,
    ),
    Case(
        "snp.chip_id: another machine",
        lambda: snp_policy(chip_id=(OTHER + OTHER[:16],)),
        SNP_OK,
        devices=ONE_GPU,
    ),
    Case(
        "snp.min_tcb: an fmc floor (no Trustee claim)",
        lambda: snp_policy(min_tcb={**snp_policy().snp.min_tcb, "fmc": 0}),
        SNP_OK,
        devices=ONE_GPU,  # type: ignore[union-attr]
        refused="snp.min_tcb",
    ),
    Case(
        "snp.vmpl: VMPL 1 required", lambda: snp_policy(vmpl=1), SNP_OK, devices=ONE_GPU, refused="snp.vmpl"
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kbs_dev_and_the_trustee_export_agree(case: Case) -> None:
    """The same facts and policy: kbs-dev's check and regorus on the export give the same verdict.

    Where the export refuses a rule, no policy reaches Trustee and nothing is released; kbs-dev
    enforces the rule itself (the Milan vector has no FMC SPL, so kbs-dev denies the fmc floor).
    """
    policy, primary, devices = case.policy(), case.primary(), case.devices()
    dev = kbs_dev_releases(policy, primary, devices, case.init)
    exported = export_releases(policy, primary, devices, case.init)
    assert dev is case.allowed, case.name
    if case.refused is not None:
        assert exported == f"refused: {case.refused}"
    else:
        assert exported is dev


def test_every_rule_of_a_full_policy_has_a_place_in_trustee() -> None:
    """Each rule evaluate() applies is placed in the export (or refused): none is dropped."""
    policy = tdx_policy()
    export = export_policy(policy, [INIT])
    placed = {p.rule for p in export.placements}
    from attest.kbs.dev.appraisal import Appraisal as _  # noqa: F401  (kbs-dev is the reference)
    from attest.verify.workload import WorkloadFacts

    outcomes = policy.evaluate(WorkloadFacts(primary=launched(TDX, INIT), devices=(HOPPERS,)))
    for outcome in outcomes:
        rule = outcome.rule
        assert rule in placed or any(p.startswith(rule + ".") for p in placed), rule
    snp = export_policy(dataclasses.replace(snp_policy(allow_smt=False, allow_migration=False)), [INIT])
    snp_rules = {p.rule for p in snp.placements}
    assert {"snp.measurement", "snp.min_tcb", "snp.debug", "snp.migration", "snp.smt", "snp.vmpl",
            "snp.chip_id"} <= snp_rules  # fmt: skip


def test_one_non_affirming_gpu_of_eight_denies_even_if_its_claims_match() -> None:
    """CoCo's example checks gpu0 only; the export requires every gpuN affirming."""
    export = export_policy(tdx_policy(), [INIT])
    claims = token(launched(TDX, INIT), (HOPPERS,), INIT, export.attestation_policies)
    assert all(s["ear.status"] == "affirming" for s in claims["submods"].values())
    assert allows(export.resource_policy, claims, PATH)
    claims["submods"]["gpu6"]["ear.status"] = "warning"
    assert not allows(export.resource_policy, claims, PATH)
    claims["submods"]["gpu6"]["ear.status"] = "affirming"
    claims["submods"]["gpu8"] = claims["submods"]["gpu0"]
    assert not allows(export.resource_policy, claims, PATH)


def test_trustees_default_attestation_policies_alone_release_nothing() -> None:
    """Without the exported attestation policies (ear.status not affirming) the KBS refuses."""
    export = export_policy(tdx_policy(), [INIT])
    claims = token(launched(TDX, INIT), (HOPPERS,), INIT, {})
    assert not allows(export.resource_policy, claims, PATH)


def test_another_resource_and_another_plugin_are_refused() -> None:
    export = export_policy(tdx_policy(), [INIT])
    claims = token(launched(TDX, INIT), (HOPPERS,), INIT, export.attestation_policies)
    assert allows(export.resource_policy, claims, PATH)
    assert not allows(export.resource_policy, claims, "models/other/key")


def test_init_data_claims_are_checked_too() -> None:
    """The register is right but the token's init_data_claims carry another declaration."""
    export = export_policy(tdx_policy(), [INIT])
    other = init_data("sha256:" + "cd" * 32)
    claims = token(launched(TDX, INIT), (HOPPERS,), other, export.attestation_policies)
    assert not allows(export.resource_policy, claims, PATH)


def test_two_allowed_releases_both_get_the_key() -> None:
    """A new model release: both init-data are pinned and given; each enclave gets the key."""
    new_model = "sha256:" + "12" * 32
    new = init_data(new_model, version="0.2.0")
    new_config = "sha256:" + new.pins.config_sha256  # type: ignore[union-attr]
    policy = with_workload(tdx_policy(), model=(MODEL, new_model), config=(CONFIG, new_config),
                           init_data=((INIT.algorithm, INIT.digest), (new.algorithm, new.digest)),
                           runtime_version=("0.1.0", "0.2.0"))  # fmt: skip
    export = export_policy(policy, [INIT, new])
    for init in (INIT, new):
        assert trustee_releases(export, launched(TDX, init), (HOPPERS,), init, PATH)
        assert kbs_dev_releases(policy, launched(TDX, init), (HOPPERS,), init)


def test_export_refuses_without_init_data_or_with_an_unpinned_or_undeclared_one() -> None:
    policy = tdx_policy()
    with pytest.raises(ExportRefused, match=r"workload\.model: Trustee cannot read the model"):
        check_init_data(policy, [])
    with pytest.raises(
        ExportRefused, match=r"workload.init_data: .* is not one of the policy's init_data pins"
    ):
        check_init_data(policy, [init_data("sha256:" + "cd" * 32)])
    bare = InitData.build(entries=[("policy.rego", "package agent_policy\n")])
    with pytest.raises(ExportRefused, match=f"has no {ENCLAVE_SERVE_ENTRY} declaration"):
        check_init_data(with_workload(policy, init_data=((bare.algorithm, bare.digest),)), [bare])
    two = with_workload(policy, init_data=((INIT.algorithm, INIT.digest), ("sha384", OTHER)))
    with pytest.raises(ExportRefused, match="no init-data given for pin"):
        check_init_data(two, [INIT])
    broken = InitData.build(entries=[(ENCLAVE_SERVE_ENTRY, "model = 1\n")])
    with pytest.raises(MalformedEvidence):
        assert broken.pins is None
    with pytest.raises(ExportRefused, match=r"workload\.init_data"):
        check_init_data(with_workload(policy, init_data=((broken.algorithm, broken.digest),)), [broken])


def test_the_script_installs_all_three_policies() -> None:
    export = export_policy(tdx_policy(), [INIT])
    script = kbs_client_script(export, kbs_url="https://kbs.example:8080")
    assert (
        "set-attestation-policy --type rego --id default_cpu --policy-file attestation-policy-default_cpu.rego"
        in script
    )
    assert "--id default_gpu --policy-file attestation-policy-default_gpu.rego" in script
    assert script.rstrip().endswith("set-resource-policy --policy-file resource-policy.rego")
    assert set(export.files()) == {"resource-policy.rego", "attestation-policy-default_cpu.rego",
                                   "attestation-policy-default_gpu.rego"}  # fmt: skip
    assert "--cert-file" not in script
    private = kbs_client_script(export, kbs_url="https://kbs.example:8080", cacert="ca.pem")
    admin = (
        "kbs-client --url https://kbs.example:8080 --cert-file ca.pem config --admin-token-file admin.jwt "
    )
    assert all(line.startswith(admin) for line in private.splitlines() if line.startswith("kbs-client"))
    assert private.count(admin) == 3  # the CA on every command, as docs/kbs.md shows
