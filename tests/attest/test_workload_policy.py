"""The workload policy file: strict parsing, and every rule on the real TDX and SNP vectors."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from attest.evidence import TeeKind
from attest.initdata import register_for_digest
from attest.tee.result import VerificationResult
from attest.tee.snp.report import SnpEvidence
from attest.tee.tdx.quote import TdxEvidence
from attest.verify import SnpCollateral, TdxCollateral, verify_evidence
from attest.verify.workload import (
    GpuRules,
    PolicyFileError,
    SnpRules,
    TdxRules,
    WorkloadFacts,
    WorkloadPolicy,
    WorkloadRules,
)
from tests.attest.support import NOW
from tests.vector_files import vector

MODEL = "sha256:" + "ab" * 32
CONFIG = "cd" * 32
INIT = "sha384:" + hashlib.sha384(b"an init-data document").hexdigest()


@pytest.fixture(scope="module")
def tdx_result() -> VerificationResult:
    collateral = TdxCollateral.from_json(vector("tdx/tdx_quote_collateral.json"))
    return verify_evidence(
        TdxEvidence(quote=vector("tdx/tdx_quote")), expected_report_data=None, now=NOW, collateral=collateral
    )


@pytest.fixture(scope="module")
def snp_result() -> VerificationResult:
    return verify_evidence(
        SnpEvidence(report=vector("snp/test-report.bin")),
        expected_report_data=None,
        now=NOW,
        collateral=SnpCollateral(vek=vector("snp/test-vcek.der")),
    )


def tdx_policy(result: VerificationResult, **tdx: str) -> str:
    c = result.claims
    values = {
        "mrtd": f'["{c.mrtd.hex()}"]',  # type: ignore[union-attr]
        "rtmr0": f'["{c.rtmrs[0].hex()}"]',  # type: ignore[union-attr]
        "rtmr1": f'["{c.rtmrs[1].hex()}"]',  # type: ignore[union-attr]
        "rtmr2": f'["{c.rtmrs[2].hex()}"]',  # type: ignore[union-attr]
        **tdx,
    }
    body = "\n".join(f"{k} = {v}" for k, v in values.items())
    return f"""version = 1
[tee]
allowed = ["tdx"]
[workload]
model = ["{MODEL}"]
config = ["sha256:{CONFIG}"]
init_data = ["{INIT}"]
runtime_version = ["0.1.0"]
[tdx]
{body}
"""


def facts(result: VerificationResult, **kw: object) -> WorkloadFacts:
    base: dict[str, object] = {
        "primary": result, "model_digest": MODEL, "config_sha256": CONFIG, "runtime_version": "0.1.0",
        "init_data_register": register_for_digest(result.tee, bytes.fromhex(INIT[7:])),
    }  # fmt: skip
    base.update(kw)
    return WorkloadFacts(**base)  # type: ignore[arg-type]


def failed(policy: WorkloadPolicy, f: WorkloadFacts) -> dict[str, str]:
    return {o.rule: o.detail for o in policy.evaluate(f) if not o.ok}


def test_the_tdx_vector_satisfies_its_own_pins(tdx_result: VerificationResult) -> None:
    policy = WorkloadPolicy.from_toml(tdx_policy(tdx_result))
    outcomes = policy.check(facts(tdx_result))
    assert [o.rule for o in outcomes] == [
        "tee", "tdx.mrtd", "tdx.rtmr0", "tdx.rtmr1", "tdx.rtmr2", "tdx.tcb_status", "tdx.collateral",
        "tdx.debug", "tdx.migratable", "tdx.sept_ve_disable", "workload.init_data", "gpu",
        "workload.model", "workload.config", "workload.runtime_version",
    ]  # fmt: skip
    # A recorded policy reads back as itself.
    assert WorkloadPolicy.from_toml(policy.to_toml()) == policy


@pytest.mark.parametrize(
    ("change", "rule", "message"),
    [
        ({"mrtd": '["' + "00" * 48 + '"]'}, "tdx.mrtd", "MRTD"),
        ({"rtmr2": '["' + "00" * 48 + '"]'}, "tdx.rtmr2", "RTMR2"),
        ({"rtmr3": '["' + "11" * 48 + '"]'}, "tdx.rtmr3", "RTMR3"),
        ({"tcb_status": '["OutOfDate"]'}, "tdx.tcb_status", "UpToDate is not allowed"),
        ({"ppid": '["' + "00" * 16 + '"]'}, "tdx.ppid", "not an allowed machine"),
    ],
)
def test_each_tdx_rule_refuses_what_it_does_not_allow(
    tdx_result: VerificationResult, change: dict[str, str], rule: str, message: str
) -> None:
    policy = WorkloadPolicy.from_toml(tdx_policy(tdx_result, **change))
    problems = failed(policy, facts(tdx_result))
    assert list(problems) == [rule] and message in problems[rule]


def test_tdx_without_collateral_is_refused_by_default(tdx_result: VerificationResult) -> None:
    no_collateral = verify_evidence(
        TdxEvidence(quote=vector("tdx/tdx_quote")), expected_report_data=None, now=NOW
    )
    policy = WorkloadPolicy.from_toml(tdx_policy(tdx_result))
    problems = failed(policy, facts(no_collateral))
    assert set(problems) == {"tdx.tcb_status", "tdx.collateral"}
    assert "no DCAP collateral" in problems["tdx.tcb_status"]
    lenient = WorkloadPolicy.from_toml(
        tdx_policy(tdx_result, tcb_status='["UpToDate", "unknown"]', require_collateral="false")
    )
    assert failed(lenient, facts(no_collateral)) == {}


def test_td_attributes_debug_migratable_and_sept_ve(tdx_result: VerificationResult) -> None:
    policy = WorkloadPolicy.from_toml(tdx_policy(tdx_result))
    c = tdx_result.claims
    assert c is not None

    def with_attributes(value: int) -> WorkloadFacts:
        claims = dataclasses.replace(c, td_attributes=value.to_bytes(8, "little"))  # type: ignore[type-var]
        return facts(dataclasses.replace(tdx_result, claims=claims))

    sept = 1 << 28
    assert failed(policy, with_attributes(sept)) == {}  # the vector: SEPT_VE_DISABLE only
    assert set(failed(policy, with_attributes(sept | 1))) == {"tdx.debug"}
    assert set(failed(policy, with_attributes(sept | 1 << 29))) == {"tdx.migratable"}
    assert set(failed(policy, with_attributes(0))) == {"tdx.sept_ve_disable"}


def test_workload_rules(tdx_result: VerificationResult) -> None:
    policy = WorkloadPolicy.from_toml(tdx_policy(tdx_result))
    assert set(failed(policy, facts(tdx_result, model_digest="sha256:" + "00" * 32))) == {"workload.model"}
    assert set(failed(policy, facts(tdx_result, config_sha256="00" * 32))) == {"workload.config"}
    assert set(failed(policy, facts(tdx_result, runtime_version="9.9"))) == {"workload.runtime_version"}
    assert set(failed(policy, facts(tdx_result, init_data_register=bytes(48)))) == {"workload.init_data"}
    unknown = failed(policy, facts(tdx_result, model_digest=None))
    assert "not known on this side" in unknown["workload.model"]


def test_devices_need_gpu_rules(tdx_result: VerificationResult) -> None:
    from attest.tee.sample.claims import SampleClaims

    device = VerificationResult(
        tee=TeeKind.SAMPLE_DEVICE, insecure=True, steps=(), claims=SampleClaims(svn=1, report_data=b"")
    )
    policy = WorkloadPolicy.from_toml(tdx_policy(tdx_result))
    assert "no [gpu] rules" in failed(policy, facts(tdx_result, devices=(device,)))["gpu"]


def snp_policy(
    result: VerificationResult,
    extra: str = "",
    min_tcb: str = "bootloader = 3, tee = 0, snp = 8, microcode = 115",
) -> str:
    return f"""version = 1
[tee]
allowed = ["snp"]
[workload]
model = ["{MODEL}"]
config = ["{CONFIG}"]
init_data = ["{INIT}"]
[snp]
measurement = ["{result.claims.measurement.hex()}"]
min_tcb = {{ {min_tcb} }}
{extra}
"""  # type: ignore[union-attr]


def test_the_snp_vector_and_its_rules(snp_result: VerificationResult) -> None:
    policy = WorkloadPolicy.from_toml(snp_policy(snp_result))
    rules = [o.rule for o in policy.check(facts(snp_result))]
    assert rules[:6] == ["tee", "snp.measurement", "snp.min_tcb", "snp.debug", "snp.migration", "snp.smt"]
    higher = WorkloadPolicy.from_toml(
        snp_policy(snp_result, min_tcb="bootloader = 3, tee = 0, snp = 9, microcode = 115")
    )
    assert "snp 8 < 9" in failed(higher, facts(snp_result))["snp.min_tcb"]
    no_smt = WorkloadPolicy.from_toml(snp_policy(snp_result, "allow_smt = false"))
    assert set(failed(no_smt, facts(snp_result))) == {"snp.smt"}  # the vector's guest policy allows SMT
    other_chip = WorkloadPolicy.from_toml(snp_policy(snp_result, f'chip_id = ["{"00" * 64}"]'))
    assert set(failed(other_chip, facts(snp_result))) == {"snp.chip_id"}
    # SNP's HOST_DATA is 32 bytes: the sha384 digest truncated.
    assert register_for_digest(TeeKind.SNP, bytes.fromhex(INIT[7:])) == bytes.fromhex(INIT[7:])[:32]
    # Rules for a TEE the policy does not allow are a mistake, not silently ignored.
    stray = policy.to_toml() + f'\n[tdx]\nmrtd = ["{"00" * 48}"]\nrtmr0 = ["{"00" * 48}"]\n'
    with pytest.raises(PolicyFileError, match=r"\[tdx\] is given but"):
        WorkloadPolicy.from_toml(stray)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("version = 2", "version must be 1"),
        ("version = 1", r"\[tee\] allowed is required"),
        ('version = 1\n[tee]\nallowed = []', "non-empty"),
        ('version = 1\n[tee]\nallowed = ["sgx"]', "unknown TEE"),
        ('version = 1\n[tee]\nallowed = ["sample"]', "insecure_development = true"),
        ('version = 1\n[tee]\nallowed = ["tdx"]', r"\[workload\] is required"),
        (f'version = 1\n[tee]\nallowed = ["tdx"]\n[workload]\nmodel = ["{MODEL}"]\nconfig = ["{CONFIG}"]',
         r"init_data is required"),
        (f'version = 1\n[tee]\nallowed = ["tdx"]\n[workload]\nmodel = ["{MODEL}"]\nconfig = ["{CONFIG}"]\n'
         f'init_data = ["{INIT}"]', r"no \[tdx\] rules"),
        (f'version = 1\n[tee]\nallowed = ["tdx"]\n[workload]\nmodel = ["{MODEL}"]\nconfig = ["{CONFIG}"]\n'
         f'init_data = ["{INIT}"]\n[tdx]\nmrtd = ["{"00" * 48}"]', r"rtmr0 is required"),
        (f'version = 1\n[tee]\nallowed = ["tdx"]\n[workload]\nmodel = ["{MODEL}"]\nconfig = ["{CONFIG}"]\n'
         f'init_data = ["{INIT}"]\n[tdx]\nmrtd = ["00"]', r"1 bytes, expected 48"),
        ('version = 1\nmodle = 1', "unknown key"),
        ("not toml [", "not TOML"),
    ],
)  # fmt: skip
def test_an_empty_partial_or_misspelt_policy_refuses(text: str, message: str) -> None:
    with pytest.raises(PolicyFileError, match=message):
        WorkloadPolicy.from_toml(text)


def test_the_sample_tee_needs_the_policy_line_and_the_flag() -> None:
    from attest.tee.sample.claims import SampleClaims

    sample = VerificationResult(
        tee=TeeKind.SAMPLE, insecure=True, steps=(), claims=SampleClaims(svn=1, report_data=b"")
    )
    text = (
        'version = 1\ninsecure_development = true\n[tee]\nallowed = ["sample"]\n'
        f'[workload]\nmodel = ["{MODEL}"]\nconfig = ["{CONFIG}"]\n'
    )
    policy = WorkloadPolicy.from_toml(text)
    assert (
        "--allow-insecure-sample-tee"
        in failed(policy, facts(sample, allow_insecure=False, init_data_register=None))["tee"]
    )
    assert failed(policy, facts(sample, allow_insecure=True, init_data_register=None)) == {}


def test_docs_describe_every_key() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "policy.md").read_text()
    keys = [*TdxRules.KEYS, *SnpRules.KEYS, *GpuRules.KEYS, *WorkloadRules.KEYS, "insecure_development"]
    assert [k for k in keys if f"`{k}`" not in doc] == []


# -- a policy built in Python passes the same checks as a file ---------------------------------

HEAD = 'version = 1\n[tee]\nallowed = ["tdx"]\n'
WORKLOAD = f'[workload]\nmodel = ["{MODEL}"]\nconfig = ["{CONFIG}"]\n'
PINNED = WORKLOAD + f'init_data = ["{INIT}"]\n'
TDX = "[tdx]\n" + "".join(
    f'{r} = ["{n * 96}"]\n' for r, n in zip(("mrtd", "rtmr0", "rtmr1", "rtmr2"), "1234", strict=True)
)
ZERO = "sha384:" + "00" * 48


def rules(init: str | None = INIT, **kw: object) -> WorkloadRules:
    pins = None if init is None else ((init[:6], bytes.fromhex(init[7:])),)
    return WorkloadRules(model=(MODEL,), config=(CONFIG,), init_data=pins, **kw)  # type: ignore[arg-type]


def tdx_rules(**kw: object) -> TdxRules:
    values: dict[str, object] = {
        "mrtd": (b"\x11" * 48,),
        "rtmr": ((b"\x22" * 48,), (b"\x33" * 48,), (b"\x44" * 48,), None),
    }
    values.update(kw)
    return TdxRules(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scenario", "text", "build", "message"),
    [
        ("TDX with neither [tdx] nor init_data", HEAD + WORKLOAD,
         lambda: WorkloadPolicy(tees=("tdx",), workload=rules(None)), r"init_data is required"),
        ("TDX without [tdx]", HEAD + PINNED,
         lambda: WorkloadPolicy(tees=("tdx",), workload=rules()), r"no \[tdx\] rules"),
        ("[snp] for a TEE not allowed", HEAD + PINNED + TDX + f'[snp]\nmeasurement = ["{"55" * 48}"]\n',
         lambda: WorkloadPolicy(tees=("tdx",), workload=rules(), tdx=tdx_rules(),
                                snp=SnpRules(measurement=(b"U" * 48,), min_tcb=dict.fromkeys(("bootloader", "tee", "snp", "microcode"), 0))),
         r"\[snp\] is given but"),
        ("the sample TEE without insecure_development",
         'version = 1\n[tee]\nallowed = ["sample"]\n' + WORKLOAD,
         lambda: WorkloadPolicy(tees=("sample",), workload=rules(None)), "insecure_development = true"),
        ("an unknown TEE", 'version = 1\n[tee]\nallowed = ["sgx"]\n' + PINNED,
         lambda: WorkloadPolicy(tees=("sgx",), workload=rules()), "unknown TEE"),
        ("no TEE", 'version = 1\n[tee]\nallowed = []\n' + PINNED,
         lambda: WorkloadPolicy(tees=(), workload=rules()), "non-empty list"),
        ("a short MRTD", HEAD + PINNED + TDX.replace("1" * 96, "11"),
         lambda: WorkloadPolicy(tees=("tdx",), workload=rules(), tdx=tdx_rules(mrtd=(b"\x11",))),
         "1 bytes, expected 48"),
        ("RTMR0 missing", HEAD + PINNED + TDX.replace("rtmr0", "rtmr3"),
         lambda: WorkloadPolicy(tees=("tdx",), workload=rules(),
                                tdx=tdx_rules(rtmr=(None, (b"3" * 48,), (b"4" * 48,), (b"2" * 48,)))),
         "rtmr0 is required"),
        ("no model", HEAD + PINNED.replace(f'"{MODEL}"', ""),
         lambda: WorkloadPolicy(tees=("tdx",), workload=WorkloadRules(model=(), config=(CONFIG,))),
         "model must be a non-empty list"),
        ("an unknown TCB status", HEAD + PINNED + TDX + 'tcb_status = ["Fine"]\n',
         lambda: WorkloadPolicy(tees=("tdx",), workload=rules(), tdx=tdx_rules(tcb_status=("Fine",))),
         "unknown status"),
        ("GPUs without driver pins", HEAD + PINNED + TDX + "[gpu]\ncount = 1\n",
         lambda: WorkloadPolicy(tees=("tdx",), workload=rules(), tdx=tdx_rules(), gpu=GpuRules(count=1)),
         r"\[gpu\] driver is required"),
        ("an SNP floor missing microcode",
         'version = 1\n[tee]\nallowed = ["snp"]\n' + PINNED
         + f'[snp]\nmeasurement = ["{"55" * 48}"]\nmin_tcb = {{ bootloader = 1, tee = 0, snp = 8 }}\n',
         lambda: WorkloadPolicy(tees=("snp",), workload=rules(),
                                snp=SnpRules(measurement=(b"U" * 48,), min_tcb={"bootloader": 1, "tee": 0, "snp": 8})),
         "needs bootloader, tee, snp and microcode"),
        ("a zero init-data pin", HEAD + PINNED.replace(INIT, ZERO) + TDX,
         lambda: WorkloadPolicy(tees=("tdx",), workload=rules(ZERO), tdx=tdx_rules()),
         "launched with no init-data"),
    ],
)  # fmt: skip
def test_a_policy_built_in_python_is_refused_exactly_as_the_file(
    scenario: str, text: str, build: Callable[[], WorkloadPolicy], message: str
) -> None:
    with pytest.raises(PolicyFileError, match=message) as from_file:
        WorkloadPolicy.from_toml(text)
    with pytest.raises(PolicyFileError) as built:
        build()
    assert str(built.value) == str(from_file.value), scenario


def test_a_policy_built_in_python_equals_the_file_it_writes() -> None:
    policy = WorkloadPolicy(
        tees=["tdx"],  # type: ignore[arg-type]
        workload=WorkloadRules(model=(MODEL,), config=(CONFIG,), init_data=(("sha384", bytes.fromhex(INIT[7:])),)),
        tdx=tdx_rules(),
        gpu=GpuRules(count=1, arch=("hopper",), driver=("550.90.07",), vbios=("96.00.9F.00.01",)),
    )  # fmt: skip
    assert policy.tees == ("tdx",) and policy.workload.config == ("sha256:" + CONFIG,)
    assert (
        policy.gpu is not None and policy.gpu.arch == ("HOPPER",) and policy.gpu.vbios == ("96.00.9f.00.01",)
    )
    assert WorkloadPolicy.from_toml(policy.to_toml()) == policy


@pytest.mark.parametrize(
    ("pin", "message"),
    [
        ("sha384:" + "00" * 48, "zero bytes"),
        ("sha256:" + "00" * 32, "zero bytes"),
        ("sha512:" + "00" * 64, "zero bytes"),
        # SNP's HOST_DATA carries the first 32 bytes: zero there is a zero register too.
        ("sha384:" + "00" * 32 + "ab" * 16, "zero bytes"),
        ("sha384:" + "ff" * 48, r"one byte \(0xff\) repeated"),
    ],
)
def test_an_init_data_pin_of_no_init_data_or_a_placeholder_is_refused(pin: str, message: str) -> None:
    with pytest.raises(PolicyFileError, match=message) as info:
        WorkloadPolicy.from_toml(HEAD + PINNED.replace(INIT, pin) + TDX)
    assert "docs/policy.md" in str(info.value) and "enclave-serve initdata" in str(info.value)
    if message == "zero bytes":
        assert "would accept any VM the host launches without init-data" in str(info.value)
    with pytest.raises(PolicyFileError, match=message):
        rules(pin)
