"""The provider's and the user's commands: initdata, policy record/show/trustee, measure snp (real CLI)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
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
from tests.attest.support import NOW, vector
from tests.attest.test_verdict import CONFIG, NONCE, SPKI, document, run
from tests.attest.test_verdict import INIT as SAMPLE_INIT

REPO = Path(__file__).resolve().parents[2]
ES = str(Path(sys.executable).parent / "enclave-serve")
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


def es(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ES, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_initdata_declares_everything_and_prints_both_digests(tmp_path: Path) -> None:
    out = tmp_path / "initdata.toml"
    result = es("initdata", "/models/tiny", "--kbs-url", "https://kbs.example:8080", "--allow-insecure-agent-policy",
                "--expect-model", MODEL, "--key-id", "kbs:///m/key/tiny", "--tee", "tdx", "--watchdog-interval",
                "30", "--env", "OMP_NUM_THREADS=4", "-o", str(out), "--json", "--", "--max-model-len", "512")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING: no --image-facts" in result.stderr
    shown = json.loads(result.stdout)
    init = InitData.from_bytes(out.read_bytes())
    assert shown["init_data_digest"] == init.digest_text and init.algorithm == "sha384"
    assert shown["mrconfigid"] == init.register(TeeKind.TDX).hex() == init.digest.hex()
    assert shown["host_data"] == init.digest.hex()[:64]
    assert shown["insecure_agent_policy"] is True
    assert set(init.data) == {"aa.toml", "cdh.toml", "policy.rego", "enclave-serve.toml"}
    pins = init.pins
    assert pins is not None and pins.model == MODEL and pins.vllm_args == ("--max-model-len", "512")
    assert pins.key_resource == "kbs:///m/key/tiny" and pins.environment == {"OMP_NUM_THREADS": "4"}
    assert pins.settings["tee"] == "tdx" and pins.settings["watchdog_interval_s"] == 30.0
    assert pins.settings["model_source"] == "/models/tiny" and "host" not in pins.settings
    assert shown["config_sha256"] == "sha256:" + pins.config_sha256
    assert "https://kbs.example:8080" in init.data["aa.toml"] and "cc_kbc" in init.data["cdh.toml"]
    annotation = Path(shown["annotation_file"]).read_text().strip()
    assert InitData.from_annotation(annotation).raw == init.raw
    text = es("initdata", "/models/tiny", "--kbs-url", "https://kbs.example:8080", "--allow-insecure-agent-policy",
              "--expect-model", MODEL, "--key-id", "kbs:///m/key/tiny", "--tee", "tdx", "--watchdog-interval",
              "30", "--env", "OMP_NUM_THREADS=4", "-o", str(out), "--", "--max-model-len", "512")  # fmt: skip
    assert f"config sha256:{pins.config_sha256}" in text.stdout.splitlines()


def test_initdata_takes_the_image_facts_and_refuses_what_cannot_be_declared(tmp_path: Path) -> None:
    facts = tmp_path / "facts.json"
    # As the image build runs it: an environment of its own (not this test process's, to which
    # importing PyTorch adds variables).
    shown = subprocess.run([ES, "image-facts"], capture_output=True, text=True, timeout=120,
                           env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "LANG": "C.UTF-8"})  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    image = json.loads(shown.stdout)
    assert image["environment"] == {"OMP_NUM_THREADS": "2"}  # attested only: LANG is operational
    facts.write_text(json.dumps({**image, "vllm": "9.9.9"}))
    base = ("initdata", "/m", "--kbs-url", "https://k", "--allow-insecure-agent-policy", "--expect-model", MODEL,
            "--key-id", "kbs:///m/key/tiny", "-o", str(tmp_path / "i.toml"))  # fmt: skip
    ok = es(*base, "--image-facts", str(facts))
    assert ok.returncode == 0 and "no --image-facts" not in ok.stderr
    pins = InitData.from_bytes((tmp_path / "i.toml").read_bytes()).pins
    assert (
        pins is not None and pins.runtime["vllm"] == "9.9.9" and pins.environment == {"OMP_NUM_THREADS": "2"}
    )
    for extra, why in (
        (("--env", "LD_PRELOAD=/x.so"), "LD_PRELOAD"),
        (("--env", "LANG=C.UTF-8"), "operational, never attested"),
        (("--env", "VLLM_API_KEY=secret"), "declare it as <redacted>"),
        (("--", "--api-key", "secret"), "VLLM_API_KEY=<redacted>"),
    ):
        refused = es(*base, *extra)
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        assert "secret" not in refused.stderr.replace("a secret", "")


def test_initdata_needs_an_agent_policy_or_the_insecure_flag(tmp_path: Path) -> None:
    result = es(
        "initdata", "/m", "--kbs-url", "https://kbs", "--expect-model", MODEL, "-o", str(tmp_path / "x")
    )
    assert result.returncode == 2 and "agent-policy" in result.stderr
    rego = tmp_path / "policy.rego"
    rego.write_text("package agent_policy\ndefault ExecProcessRequest := false\n")
    ok = es("initdata", "/m", "--kbs-url", "https://kbs", "--expect-model", MODEL, "--agent-policy", str(rego),
            "--key-id", "kbs:///m/key/tiny", "-o", str(tmp_path / "y"))  # fmt: skip
    assert ok.returncode == 0 and "INSECURE" not in ok.stdout
    assert InitData.from_bytes((tmp_path / "y").read_bytes()).data["policy.rego"] == rego.read_text()


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


def test_measure_snp_reproduces_the_published_vector() -> None:
    result = es("measure", "snp", "--ovmf", "tests/vectors/snp-measure/ovmf_AmdSev_suffix.bin",
                "--kernel", "/dev/null", "--initrd", "/dev/null", "--vcpus", "1", "--vcpu-type", "EPYC-v4",
                "--guest-features", "0x21", "--ovmf-hash",
                "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "329c8ce0972ae52343b64d34a434a86f245dfd74f5ed7aae15d22efc78fb9683632b9b50e4e1d7fa41179ef98a7ef198"
    )


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
