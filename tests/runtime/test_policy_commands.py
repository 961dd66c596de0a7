"""The provider's and the user's commands: initdata, policy show/trustee, measure snp (real CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from attest.evidence import TeeKind
from attest.initdata import InitData
from attest.verify.workload import WorkloadPolicy

REPO = Path(__file__).resolve().parents[2]
ES = str(Path(sys.executable).parent / "enclave-serve")
MODEL = "sha256:" + "ab" * 32
POLICY = f"""version = 1
[tee]
allowed = ["tdx", "snp"]
[workload]
model = ["{MODEL}"]
config = ["sha256:{"cd" * 32}"]
init_data = ["sha384:{"ef" * 48}"]
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


def test_initdata_writes_the_pins_and_prints_the_registers(tmp_path: Path) -> None:
    out = tmp_path / "initdata.toml"
    result = es("initdata", "--kbs-url", "https://kbs.example:8080", "--allow-insecure-agent-policy",
                "--expect-model", MODEL, "--key-id", "kbs:///m/key/tiny", "--config-sha256", "cd" * 32,
                "-o", str(out), "--json", "--", "--max-model-len", "512")  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    init = InitData.from_bytes(out.read_bytes())
    assert shown["digest"] == init.digest_text and init.algorithm == "sha384"
    assert shown["mrconfigid"] == init.register(TeeKind.TDX).hex() == init.digest.hex()
    assert shown["host_data"] == init.digest.hex()[:64]
    assert shown["insecure_agent_policy"] is True
    assert set(init.data) == {"aa.toml", "cdh.toml", "policy.rego", "enclave-serve.toml"}
    pins = init.pins
    assert pins is not None and pins.model == MODEL and pins.vllm_args == ("--max-model-len", "512")
    assert pins.config_sha256 == "cd" * 32 and pins.key_resource == "kbs:///m/key/tiny"
    assert "https://kbs.example:8080" in init.data["aa.toml"] and "cc_kbc" in init.data["cdh.toml"]
    annotation = Path(shown["annotation_file"]).read_text().strip()
    assert InitData.from_annotation(annotation).raw == init.raw


def test_initdata_needs_an_agent_policy_or_the_insecure_flag(tmp_path: Path) -> None:
    result = es("initdata", "--kbs-url", "https://kbs", "--expect-model", MODEL, "-o", str(tmp_path / "x"))
    assert result.returncode == 2 and "agent-policy" in result.stderr
    rego = tmp_path / "policy.rego"
    rego.write_text("package agent_policy\ndefault ExecProcessRequest := false\n")
    ok = es("initdata", "--kbs-url", "https://kbs", "--expect-model", MODEL, "--agent-policy", str(rego),
            "-o", str(tmp_path / "y"))  # fmt: skip
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


def test_policy_trustee_exports_rego_and_reference_values(tmp_path: Path) -> None:
    policy_file = tmp_path / "p.toml"
    policy_file.write_text(POLICY)
    result = es("policy", "trustee", str(policy_file), "-o", str(tmp_path / "trustee"))
    assert result.returncode == 0, result.stderr
    rego = (tmp_path / "trustee" / "resource-policy.rego").read_text()
    assert (
        rego.startswith("# enclave-serve") and "package policy" in rego and "default allow := false" in rego
    )
    policy = WorkloadPolicy.from_toml(POLICY)
    init_tdx = "ef" * 48
    assert f'ae.init_data in {{"{init_tdx}"}}' in rego  # TDX: the sha384 digest is MRCONFIGID
    assert f'ae.init_data in {{"{init_tdx[:64]}"}}' in rego  # SNP: truncated to HOST_DATA
    assert f'ae.tdx.quote.body.mr_td in {{"{"11" * 48}"}}' in rego
    assert "ae.snp.reported_tcb_snp >= 23" in rego and "count(gpu_submods) == 1" in rego
    values = json.loads((tmp_path / "trustee" / "reference-values.json").read_text())
    assert values["mr_td"] == ["11" * 48] and values["snp_launch_measurement"] == ["55" * 48]
    assert values["snp_snp_svn"] == [23]
    script = (tmp_path / "trustee" / "kbs-client.sh").read_text()
    assert "set-sample-reference-value snp_bootloader 10 --as-integer" in script
    assert "set-resource-policy --policy-file resource-policy.rego" in script
    assert policy.tdx is not None


def test_measure_snp_reproduces_the_published_vector() -> None:
    result = es("measure", "snp", "--ovmf", "tests/vectors/snp-measure/ovmf_AmdSev_suffix.bin",
                "--kernel", "/dev/null", "--initrd", "/dev/null", "--vcpus", "1", "--vcpu-type", "EPYC-v4",
                "--guest-features", "0x21", "--ovmf-hash",
                "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "329c8ce0972ae52343b64d34a434a86f245dfd74f5ed7aae15d22efc78fb9683632b9b50e4e1d7fa41179ef98a7ef198"
    )
