"""``enclave-serve policy record/show/trustee`` (real CLI)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from attest.client.record import NoInitData, record_policy
from attest.client.remote import VerificationBundle
from attest.evidence import TeeKind
from attest.initdata import InitData
from attest.tee.tdx.quote import TdxEvidence
from attest.verify import TdxClaims, verify_evidence
from attest.verify.workload import WorkloadPolicy
from runtime.cli import main
from tests.attest.support import NOW
from tests.attest.test_verdict import CONFIG, NONCE, SPKI, document, run
from tests.attest.test_verdict import INIT as SAMPLE_INIT
from tests.runtime.commands.support import es
from tests.vector_files import vector

MODEL = "sha256:" + "ab" * 32
INIT = hashlib.sha384(b"an init-data document").hexdigest()
POLICY = f"""version = 1
[tee]
allowed = ["tdx", "snp"]
[workload]
model = ["{MODEL}"]
config = ["sha256:{"cd" * 32}"]
init_data = ["sha384:{INIT}"]
[tdx]
mrtd = ["{"11" * 48}"]
rtmr0 = ["{"22" * 48}"]
rtmr1 = ["{"33" * 48}"]
rtmr2 = ["{"44" * 48}"]
[snp]
measurement = ["{"55" * 48}"]
min_tcb = {{ bootloader = 10, tee = 0, snp = 23, microcode = 213 }}
[gpu]
count = 1
arch = ["HOPPER"]
driver = ["550.90.07"]
vbios = ["96.00.9f.00.01"]
"""


def test_policy_show_explains_or_names_what_is_wrong(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(POLICY)
    shown = es("policy", "show", str(good))
    assert shown.returncode == 0
    assert "TEE: tdx or snp" in shown.stdout and "1 GPU(s)" in shown.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(POLICY.replace('model = ["', 'modle = ["'))
    refused = es("policy", "show", str(bad))
    assert refused.returncode == 1 and "unknown key(s) modle" in refused.stderr


def test_policy_trustee_without_init_data_is_refused_naming_the_rule(tmp_path: Path) -> None:
    """Trustee cannot read the model and configuration: the allowed init-data must be given."""
    policy_file = tmp_path / "p.toml"
    policy_file.write_text(POLICY)
    result = es("policy", "trustee", str(policy_file), "-o", str(tmp_path / "trustee"))
    assert result.returncode == 1 and "workload.model: Trustee cannot read the model" in result.stderr
    assert not (tmp_path / "trustee").exists()


def record(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, register: bytes | None, claimed: str | None
) -> tuple[int, Path]:
    """``policy record`` through the CLI entry point, against a sample server's fetched bundle."""
    bundle = VerificationBundle(
        url="https://enclave.example", nonce=NONCE, tls_spki_sha256=SPKI, tls_certificate_pem=None,
        document=document(register=register, claimed=claimed), config=CONFIG.raw,
    )  # fmt: skip
    monkeypatch.setattr("attest.client.remote.fetch_bundle", lambda url: bundle)
    out = tmp_path / "recorded.toml"
    code = main(["policy", "record", bundle.url, "-o", str(out), "--allow-insecure-sample-tee"])
    return code, out


def test_policy_record_pins_the_init_data_the_server_was_launched_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, out = record(
        monkeypatch, tmp_path, register=SAMPLE_INIT.register(TeeKind.SAMPLE), claimed=SAMPLE_INIT.digest_text
    )
    assert code == 0
    assert WorkloadPolicy.load(out).workload.init_data == (("sha384", SAMPLE_INIT.digest),)


def test_policy_record_refuses_a_server_launched_without_init_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sample TEE without --sample-init-data: a recorded pin would be a zero register."""
    code, out = record(monkeypatch, tmp_path, register=None, claimed=None)
    assert code == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "launched WITHOUT init-data" in err and "nothing recorded" in err
    assert "'enclave-serve initdata'" in err and "--sample-init-data" in err


def test_recording_a_td_whose_mrconfigid_is_zero_is_refused() -> None:
    """The DCAP vector's TD was launched without init-data: MRCONFIGID is zero."""
    tdx = verify_evidence(TdxEvidence(quote=vector("tdx/tdx_quote")), expected_report_data=None, now=NOW)
    assert isinstance(tdx.claims, TdxClaims) and not any(tdx.claims.mr_config_id)
    verdict = run(document(), policy=None, allow_unpinned_software=True)
    assert verdict.ok and verdict.document is not None
    claims = dataclasses.replace(verdict.document.claims, init_data=None)
    td = dataclasses.replace(
        verdict, primary=tdx, document=dataclasses.replace(verdict.document, claims=claims)
    )
    with pytest.raises(NoInitData, match="would pin a zero register"):
        record_policy(td)


def _trustee_init(tmp_path: Path, model: str = MODEL) -> tuple[Path, InitData]:
    from tests.attest.support import workload_pins

    pins = workload_pins(model, key_resource="kbs:///models/llama/key")
    init = InitData.build(
        entries=[("policy.rego", "package agent_policy\n"), ("enclave-serve.toml", pins.to_toml())]
    )
    path = tmp_path / f"initdata-{model[7:15]}.toml"
    path.write_bytes(init.raw)
    return path, init


def _trustee_policy(init: InitData, *, config: str, tee: str = "tdx", extra: str = "") -> str:
    return (
        POLICY.replace(f'init_data = ["sha384:{INIT}"]', f'init_data = ["{init.digest_text}"]').replace(
            f'config = ["sha256:{"cd" * 32}"]', f'config = ["{config}"]\nruntime_version = ["0.1.0"]'
        )
        + extra
    )


def test_policy_trustee_exports_every_rule_for_the_allowed_init_data(tmp_path: Path) -> None:
    path, init = _trustee_init(tmp_path)
    assert init.pins is not None
    policy_file = tmp_path / "p.toml"
    policy_file.write_text(_trustee_policy(init, config="sha256:" + init.pins.config_sha256))
    out = tmp_path / "trustee"
    result = es("policy", "trustee", str(policy_file), "--init-data", str(path), "-o", str(out),
                "--kbs-url", "https://kbs.example:8080")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "attestation-policy-default_cpu.rego", "attestation-policy-default_gpu.rego", "kbs-client.sh",
        "resource-policy.rego",
    ]  # fmt: skip
    rego = (out / "resource-policy.rego").read_text()
    assert f'ae.init_data in {{"{init.digest.hex()}"}}' in rego  # TDX: the sha384 digest is MRCONFIGID
    assert f'ae.init_data in {{"{init.digest.hex()[:64]}"}}' in rego  # SNP: truncated to HOST_DATA
    assert '"ear.status"] == "affirming"' in rego and "count(gpu_submods) == 1" in rego
    assert 'c.quote.body.mr_td in {"' + "11" * 48 + '"}' in rego and "c.reported_tcb_snp >= 23" in rego
    for rule in ("tdx.mrtd", "tdx.migratable", "tdx.collateral", "snp.smt", "snp.vmpl", "gpu.driver",
                 "workload.model", "workload.config", "workload.runtime_version", "workload.init_data"):  # fmt: skip
        assert f"  {rule}: " in result.stdout, rule
    assert "--id default_gpu" in (out / "kbs-client.sh").read_text()


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ("model", "workload.model"),
        ("config", "workload.config"),
        ("fmc", "snp.min_tcb"),
        ("vmpl", "snp.vmpl"),
    ],
)
def test_policy_trustee_refuses_naming_the_rule(tmp_path: Path, change: str, rule: str) -> None:
    path, init = _trustee_init(tmp_path)
    assert init.pins is not None
    config = "sha256:" + init.pins.config_sha256
    text = _trustee_policy(init, config=config)
    if change == "model":
        text = text.replace(f'model = ["{MODEL}"]', f'model = ["sha256:{"ef" * 32}"]')
    elif change == "config":
        text = text.replace(config, "sha256:" + "ef" * 32)
    elif change == "fmc":
        text = text.replace("microcode = 213 }", "microcode = 213, fmc = 1 }")
    else:
        text = text.replace("[gpu]", "vmpl = 1\n[gpu]")
    policy_file = tmp_path / "p.toml"
    policy_file.write_text(text)
    result = es("policy", "trustee", str(policy_file), "--init-data", str(path), "-o", str(tmp_path / "out"))
    assert result.returncode == 1, result.stdout
    assert f"refused, nothing written: {rule}:" in result.stderr
    assert not (tmp_path / "out").exists()
